"""REDIS_MIN_REPLICAS=1 against a real primary and replica, the Procfile's web process and a worker.

The replica is paused with SIGSTOP: it stays connected, so the primary takes writes as
before, but acknowledges none of them; WAIT then times out, and every answer that
acknowledges a write must be a 503 that says so, within REDIS_REPLICA_TIMEOUT_MS.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis
import requests

from jobs import keys
from jobs.connection import connect
from jobs.engine.job import Job
from jobs.engine.queue import Queue
from jobs.index.store import DocumentStore
from jobs.replication import NotReplicated, pinnable, pinned
from jobs.settings import Settings, get_settings
from scripts import release
from scripts.embedded_redis import EmbeddedRedis, free_port, server_binary
from tests.support import Process, WebService, base_env, start_workers, wait_until

pytestmark = pytest.mark.integration

TIMEOUT_MS = 1000
# What a noisy two-core machine may add to the WAIT before the answer arrives.
MARGIN_SECONDS = 2.0


class Pair:
    """A primary and one replica of it, each a redis-server of the test's own."""

    def __init__(self, directory: Path) -> None:
        self.primary = EmbeddedRedis(directory / "primary", None, False)
        self.replica: EmbeddedRedis | None = None
        self.directory = directory

    def start(self) -> Pair:
        self.primary.start()
        self.replica = EmbeddedRedis(
            self.directory / "replica", None, False, "--replicaof", "127.0.0.1", str(self.primary.port)
        ).start()
        wait_until(lambda: self.online() == 1, what="the replica to be online")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.primary.url)

    def online(self) -> int:
        return len(release.online_replicas(self.client().info("replication")))

    @contextmanager
    def replica_stopped(self) -> Iterator[None]:
        """The replica paused (SIGSTOP): still connected, acknowledging nothing."""
        self.replica.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.replica.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.replica is not None:
            if self.replica.process is not None and self.replica.process.poll() is None:
                self.replica.process.send_signal(signal.SIGCONT)  # a stopped process ignores SIGTERM
            self.replica.stop()
        self.primary.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    servers = Pair(tmp_path_factory.mktemp("replicated"))
    try:
        yield servers.start()
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def stack(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebService]:
    """The web process with REDIS_MIN_REPLICAS=1 on the primary, and one worker."""
    logs = tmp_path_factory.mktemp("replicated-processes")
    env = base_env(
        pair.primary.url,
        logs,
        REDIS_MIN_REPLICAS=1,
        REDIS_REPLICA_TIMEOUT_MS=TIMEOUT_MS,
        # A repeat must write nothing of its own (no rate-limit hit): then only the mark makes
        # its WAIT cover the job it reports.
        RATE_LIMIT="off",
        SEARCH_WARMUP=0,
        WEB_CONCURRENCY=1,
        JOB_MONITORING_INTERVAL=1,
    )
    started: list[Process | WebService] = []
    try:
        started.append(start_workers(env, logs, count=1))
        web = WebService(env, logs)
        started.append(web)
        yield web
    finally:
        for process in started:
            process.kill()


def timed(call, *args, **kwargs) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = call(*args, **kwargs)
    return response, time.monotonic() - started


def assert_not_replicated(response: requests.Response, elapsed: float) -> dict:
    """A JSON 503 `not_replicated` with Retry-After, after WAIT's timeout and not much later."""
    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert int(response.headers["Retry-After"]) > 0
    error = response.json()["error"]
    assert error["code"] == "not_replicated" and "may or may not have been applied" in error["message"]
    assert error["details"] == {"replicas_required": 1, "replicas_confirmed": 0}
    assert TIMEOUT_MS / 1000 - 0.1 <= elapsed <= TIMEOUT_MS / 1000 + MARGIN_SECONDS, elapsed
    return error


def jobs_with_message(pair: Pair, message: str) -> list[str]:
    """Ids of the jobs on the primary that log `message`."""
    client = pair.client()
    ids = [i.decode() for i in client.zrange(keys.recent_jobs("public"), 0, -1)]
    return [
        job.id for job in Job.fetch_many(ids, connection=client) if job and job.kwargs["message"] == message
    ]


# ---------------------------------------------------------------- one connection, and WAIT on it


def test_a_pinned_block_runs_all_its_redis_work_on_one_connection(pair):
    client = pinnable(pair.client())
    pool = client.connection_pool.pool
    taken: list[str] = []
    get_connection = pool.get_connection

    def counted(*args, **kwargs):
        taken.append(threading.current_thread().name)
        return get_connection(*args, **kwargs)

    pool.get_connection = counted
    elsewhere: list[int] = []
    with pinned(client):
        ids = {client.client_id()}
        for transaction in (True, False):
            with client.pipeline(transaction=transaction) as pipe:
                pipe.client_id()
                ids.update(pipe.execute())
        client.register_script("return redis.call('INCR', KEYS[1])")(keys=["afterward-test:pinned"])
        assert Queue("default", connection=client).count == 0
        ids.add(client.client_id())
        other = threading.Thread(target=lambda: elsewhere.append(client.client_id()), name="other")
        other.start()
        other.join()
    assert len(ids) == 1, ids
    assert elsewhere and elsewhere[0] not in ids, "another thread keeps the shared pool"
    assert taken == ["MainThread", "other"]


def test_a_confirmation_covers_what_the_request_read_not_only_what_it_wrote(pair):
    client, elsewhere = pinnable(pair.client()), pair.client()
    with pinned(client) as pin:
        client.set("afterward-test:before", 1)
        assert pin.confirm(1, TIMEOUT_MS) == 1
        with pair.replica_stopped():
            elsewhere.set("afterward-test:meanwhile", 1)  # another connection: the replica lacks it
            assert client.get("afterward-test:meanwhile") == b"1"
            # Redis 7.2 and later count only a connection's own writes, which the replica has:
            # the mark makes the WAIT cover what the request read. (Up to 7.0, the suite's
            # servers, any command moved the connection's offset, the GET above included.)
            with pytest.raises(NotReplicated) as refused:
                pin.confirm(1, 300)
            assert refused.value.confirmed == 0
        assert pin.confirm(1, TIMEOUT_MS) == 1


# ---------------------------------------------------------------- the API


def test_submissions_wait_for_the_replica_and_a_repeat_gets_the_one_job(pair, stack):
    # (a) With the replica keeping up: 202, and the job runs.
    accepted = stack.post_job("log", {"message": "replicated"})
    assert accepted.status_code == 202, accepted.text
    assert stack.wait_for_status(accepted.json()["id"], {"finished", "failed"})["status"] == "finished"

    message = f"unconfirmed {uuid.uuid4().hex}"
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    with pair.replica_stopped():
        # (b) The primary takes the job, the replica does not confirm it: 503, within the timeout.
        assert_not_replicated(*timed(stack.post_job, "log", {"message": message}, headers=headers))
        (stored,) = jobs_with_message(pair, message)
        # A repeat meanwhile reports that same unconfirmed job: it waits for the replica too.
        assert_not_replicated(*timed(stack.post_job, "log", {"message": message}, headers=headers))

    # (c) Once the replica is back, the repeat is answered with the one job.
    again = stack.post_job("log", {"message": message}, headers=headers)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true", again.text
    assert again.json()["id"] == stored
    assert jobs_with_message(pair, message) == [stored]
    assert stack.wait_for_status(stored, {"finished", "failed"})["status"] == "finished"

    # (d) New submissions are accepted again.
    after = stack.post_job("log", {"message": "after"})
    assert after.status_code == 202, after.text


def test_cancel_retry_and_delete_wait_for_the_replica(pair, stack):
    http = stack.http
    cancel_first, cancel_later = (
        stack.post_job("log", {"message": "later", "delay": 600}).json()["id"] for _ in range(2)
    )
    # Each fails twice, then succeeds: a retry fails once more, the next one finishes.
    failing = stack.post_job("flaky", {"failures": 2}).json()["id"]
    failing_low = stack.post_job("flaky", {"failures": 2, "queue": "low"}).json()["id"]
    for job_id in (failing, failing_low):
        assert stack.wait_for_status(job_id, {"finished", "failed"})["status"] == "failed"
    documents = DocumentStore(pair.client())
    vector = np.zeros((1, 384), dtype=np.float32)
    vector[0, 0] = 1.0
    for doc_id in ("first", "second"):
        documents.upsert(
            [{"id": doc_id, "text": f"the {doc_id} document"}], vector, 1, get_settings().embed_model_name
        )

    with pair.replica_stopped():
        assert_not_replicated(*timed(http.delete, stack.url(f"/jobs/{cancel_first}"), timeout=30))
        assert_not_replicated(*timed(http.post, stack.url(f"/jobs/{failing}/retry"), timeout=30))
        assert_not_replicated(*timed(http.post, stack.url("/jobs/retry"), json={"queue": "low"}, timeout=30))
        assert_not_replicated(*timed(http.delete, stack.url("/documents/first"), timeout=30))

    # Unconfirmed is not undone: each of them was applied ...
    assert stack.job(cancel_first)["status"] == "canceled"
    for job_id in (failing, failing_low):
        view = stack.wait_for_status(job_id, {"finished", "failed"})
        assert (view["status"], view["attempts"]) == ("failed", 2), view
    assert http.get(stack.url("/documents/first"), timeout=30).status_code == 404
    # ... and with the replica back, the same requests are answered as usual.
    assert http.delete(stack.url(f"/jobs/{cancel_later}"), timeout=30).json()["status"] == "canceled"
    assert http.post(stack.url(f"/jobs/{failing}/retry"), timeout=30).status_code == 202
    bulk = http.post(stack.url("/jobs/retry"), json={"queue": "low"}, timeout=30)
    assert bulk.status_code == 202 and bulk.json()["job_ids"] == [failing_low], bulk.text
    assert http.delete(stack.url("/documents/second"), timeout=30).json() == {"id": "second", "deleted": True}
    for job_id in (failing, failing_low):
        assert stack.wait_for_status(job_id, {"finished", "failed"})["status"] == "finished"


def test_a_primary_that_refuses_writes_for_want_of_replicas_answers_503(pair, stack):
    primary = pair.client()
    primary.config_set("min-replicas-to-write", 2)  # one more than it has
    try:
        response = stack.post_job("log", {"message": "refused"})
    finally:
        primary.config_set("min-replicas-to-write", 0)
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0, response.text
    error = response.json()["error"]
    assert error["code"] == "not_replicated" and "min-replicas-to-write" in error["message"]


# ---------------------------------------------------------------- through Sentinel


@contextmanager
def sentinel_of(pair: Pair, directory: Path) -> Iterator[str]:
    """A Sentinel watching the pair's primary; yields the redis+sentinel:// URL naming it."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sentinel.conf"  # Sentinel rewrites its configuration file
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor afterward 127.0.0.1 {pair.primary.port} 1\n"
    )
    process = subprocess.Popen(
        [server_binary(), str(config), "--sentinel"], start_new_session=True, stdout=subprocess.DEVNULL
    )
    try:
        probe = redis.Redis(port=port, socket_timeout=1)
        wait_until(lambda: probe.sentinel_get_master_addr_by_name("afterward"), what="the Sentinel")
        yield f"redis+sentinel://127.0.0.1:{port}/afterward"
    finally:
        process.kill()
        process.wait()


def test_writes_through_sentinel_are_confirmed_the_same_way(pair, monkeypatch, capsys, tmp_path):
    with sentinel_of(pair, tmp_path / "sentinel") as url:
        client = pinnable(connect(Settings(redis_url=url)))
        with pinned(client) as pin:
            client.set("afterward-test:through-sentinel", 1)
            assert pin.confirm(1, TIMEOUT_MS) == 1
        # The release check reaches the replica where the primary says it is, not at the Sentinel.
        status, out, err = release_check(monkeypatch, capsys, url, 1)
        assert status == 0 and "1 replica(s) online" in out, err
        assert "cannot reach" not in err and f"replica at 127.0.0.1:{pair.replica.port}" in err
        # One replica for REDIS_MIN_REPLICAS 1: a failover would leave none to confirm writes.
        assert "Run 2 replicas to go on taking writes through a failover" in err
        # Sentinel's default down-after (30 s) is above Redis's default max lag (10 s).
        assert "min-replicas-max-lag" not in err
        sentinel_port = int(url.split(":")[2].split("/")[0])
        redis.Redis(port=sentinel_port).execute_command(
            "SENTINEL", "SET", "afterward", "down-after-milliseconds", "5000"
        )
        status, _, err = release_check(monkeypatch, capsys, url, 1)
        assert status == 0
        assert (
            "min-replicas-max-lag (10 s) is not below the Sentinels' down-after-milliseconds (5000 ms)" in err
        )


# ---------------------------------------------------------------- the release check


def release_check(monkeypatch, capsys, url: str, replicas: int) -> tuple[int, str, str]:
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("REDIS_MIN_REPLICAS", str(replicas))
    get_settings.cache_clear()
    status = release.main()
    out, err = capsys.readouterr()
    return status, out, err


def test_the_release_check_names_the_settings_the_guarantee_needs(pair, monkeypatch, capsys):
    status, out, err = release_check(monkeypatch, capsys, pair.primary.url, 1)
    assert status == 0, err
    assert "1 replica(s) online" in out and "ready" in out
    # Warnings: this pair runs without an append-only file and without min-replicas-to-write.
    assert "warning: min-replicas-to-write is 0: set it to at least 1" in err
    assert "warning: appendonly is off on the primary" in err
    assert f"appendonly is off on the replica at 127.0.0.1:{pair.replica.port}" in err

    status, out, err = release_check(monkeypatch, capsys, pair.primary.url, 2)
    assert status == 1 and not out
    assert "REDIS_MIN_REPLICAS is 2 but the primary has 1 replica(s) online" in err

    status, _, err = release_check(monkeypatch, capsys, pair.replica.url, 1)
    assert status == 1 and "names a replica" in err


def test_the_release_check_makes_do_without_config(monkeypatch, capsys, tmp_path):
    """Managed Redis often refuses CONFIG: INFO still says what it can."""
    with EmbeddedRedis(tmp_path / "managed", None, True, "--rename-command", "CONFIG", '""') as managed:
        status, _, err = release_check(monkeypatch, capsys, managed.url, 1)
    assert status == 1 and "has 0 replica(s) online" in err, err
    assert "min-replicas-to-write is off (INFO replication; CONFIG is refused)" in err
    assert "appendonly is off" not in err  # INFO persistence reads it without CONFIG


def test_without_min_replicas_the_release_check_is_as_before(pair, monkeypatch, capsys):
    status, out, err = release_check(monkeypatch, capsys, pair.primary.url, 0)
    assert status == 0 and not err and "replica" not in out
