"""Fault injection: real signals to real workers, Redis restarted under load, evicting Redis.

A Redis of the suite's own (append-only file on) serves every test here, so restarting it
disturbs nothing else. Kills land at known points: a job publishes its pid, then waits.
Intervals are shortened through configuration (see `fault_env`), never in code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import psutil
import pytest
import redis
import requests
from rq import Queue as RQQueue
from rq.serializers import JSONSerializer

from scripts.embedded_redis import EmbeddedRedis
from tests.support import (
    DEADLINE,
    ROOT,
    Process,
    WebService,
    base_env,
    procfile_command,
    start_workers,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

RECOVERY_TARGET_SECONDS = 60


@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(
        tmp_path_factory.mktemp("fault-redis"), None, True, "--appendfsync", "always"
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_db(fault_redis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(fault_redis.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def fault_env(fault_redis, fault_db, tmp_path) -> dict[str, str]:
    return base_env(
        fault_redis.url,
        tmp_path,
        JOB_MONITORING_INTERVAL=1,
        MAINTENANCE_INTERVAL=2,
        INTERMEDIATE_GRACE=2,
        SHUTDOWN_GRACE=3,
        SEARCH_WARMUP=0,
    )


@pytest.fixture
def fweb(fault_env, tmp_path) -> Iterator[WebService]:
    web = WebService(fault_env, tmp_path)
    yield web
    web.kill()


@pytest.fixture
def fworkers(fault_env, tmp_path) -> Iterator:
    started: list[Process] = []

    def start(count: int = 1, kind: str = "worker", **extra: str) -> Process:
        process = start_workers(dict(fault_env, **extra), tmp_path, count=count, kind=kind)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def job_pid(db: redis.Redis, job_id: str) -> int:
    return int(wait_until(lambda: db.get(f"afterward-test:pid:{job_id}"), what="the job's pid"))


def submit(web: WebService, type_name: str, body: dict) -> str:
    response = web.post_job(type_name, body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def status(db: redis.Redis, job_id: str) -> str:
    return (db.hget(f"rq:job:{job_id}", "status") or b"").decode()


# ---------------------------------------------------------------- 1. SIGKILL mid-run


def test_killed_work_horse_is_retried(fweb, fworkers, fault_db):
    fworkers(count=1)
    job_id = submit(fweb, "hold", {"seconds": 600, "retries": 1})
    os.kill(job_pid(fault_db, job_id), signal.SIGKILL)
    done = fweb.wait_for_status(job_id, {"finished", "failed"})
    assert done["status"] == "finished", done
    assert done["attempts"] == 2 and done["result"] == {"attempt": 2}


def test_killed_work_horse_without_retries_fails_in_plain_words(fweb, fworkers, fault_db):
    fworkers(count=1)
    job_id = submit(fweb, "hold", {"seconds": 600})
    os.kill(job_pid(fault_db, job_id), signal.SIGKILL)
    failed = fweb.wait_for_status(job_id, {"finished", "failed"})
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "WorkerDied"


@pytest.mark.parametrize("retries", [1, 0])
def test_killed_worker_and_horse_are_recovered_within_a_minute(fweb, fworkers, fault_db, retries):
    pool = fworkers(count=1)
    job_id = submit(fweb, "hold", {"seconds": 600, "retries": retries})
    horse = psutil.Process(job_pid(fault_db, job_id))
    worker = psutil.Process(horse.ppid())
    killed_at = time.monotonic()
    for process in (worker, horse):  # the OOM killer, or a host gone
        process.kill()
    wait_until(
        lambda: status(fault_db, job_id) != "started", timeout=RECOVERY_TARGET_SECONDS, what="recovery"
    )
    recovered_in = time.monotonic() - killed_at
    print(f"\nabandoned job recovered {recovered_in:.1f} s after its worker was killed (retries={retries})")
    view = fweb.wait_for_status(job_id, {"finished", "failed"})
    if retries:
        assert view["status"] == "finished" and view["attempts"] == 2
    else:
        assert view["status"] == "failed"
        assert view["error"]["type"] == "WorkerDied"
        assert view["ended_at"] is not None  # RQ's record of an abandoned job leaves it empty
    assert pool.alive()  # the pool replaced its worker


def test_a_killed_workers_scheduler_dies_with_it_and_readyz_counts_what_lives(fweb, fworkers, fault_db):
    pool = fworkers(count=2)

    def live_workers() -> list[psutil.Process]:
        return [worker for worker in psutil.Process(pool.pid).children() if worker.is_running()]

    def readyz_workers() -> int:
        return requests.get(fweb.url("/readyz"), timeout=10).json()["checks"]["workers"]

    wait_until(lambda: readyz_workers() == 2 and fault_db.exists("rq:scheduler-lock:default"), what="workers")
    # A worker has no work-horse before its first job: the child one of them has is the scheduler.
    holder = wait_until(
        lambda: next((worker for worker in live_workers() if worker.children()), None), what="the scheduler"
    )
    scheduler = holder.children()[0]
    holder.kill()  # the OOM killer, say
    killed_at = time.monotonic()
    psutil.wait_procs([scheduler], timeout=5)
    assert not scheduler.is_running(), "the scheduler outlived its worker"
    # The pool starts a new worker; the dead one stops counting once its heartbeat would have
    # lapsed (3 x JOB_MONITORING_INTERVAL + 5 = 8 s here), not a minute later.
    wait_until(lambda: len(live_workers()) == 2, what="the replacement worker")
    time.sleep(max(0.0, killed_at + 8 + 1 - time.monotonic()))
    wait_until(lambda: readyz_workers() == 2, timeout=3, what="the dead worker to stop counting")
    assert readyz_workers() == len(live_workers()) == 2
    # Scheduling goes on: another worker takes the scheduler's locks and runs due jobs.
    job_id = submit(fweb, "log", {"message": "later", "delay": 1})
    assert fweb.wait_for_status(job_id, {"finished"})["status"] == "finished"


# ---------------------------------------------------------------- 2. SIGTERM, then SIGKILL


def heroku_stop(process: Process) -> None:
    """What Heroku does at a restart: SIGTERM to every process of the dyno."""
    for child in psutil.Process(process.pid).children(recursive=True):
        child.send_signal(signal.SIGTERM)
    process.signal(signal.SIGTERM)


def test_sigterm_during_a_long_job_puts_it_back_within_the_grace_period(fweb, fworkers, fault_db):
    pool = fworkers(count=1)
    job_id = submit(fweb, "hold", {"seconds": 600})
    job_pid(fault_db, job_id)
    stopped_at = time.monotonic()
    heroku_stop(pool)
    pool.popen.wait(timeout=25)  # well before Heroku's SIGKILL at 30 s (SHUTDOWN_GRACE is 3 s here)
    print(f"\nworker stopped {time.monotonic() - stopped_at:.1f} s after SIGTERM")
    view = fweb.job(job_id)
    assert view["status"] == "queued"
    assert view["error"]["type"] == "WorkerShutdown"
    assert view["retries_left"] == 0  # put back, not counted as a failed attempt
    fworkers(count=1)  # the next dyno
    done = fweb.wait_for_status(job_id, {"finished", "failed"})
    assert done["status"] == "finished" and done["attempts"] == 2


def test_sigterm_lets_a_short_job_finish(fweb, fworkers, fault_db):
    pool = fworkers(count=1)
    job_id = submit(fweb, "hold", {"seconds": 1.5})
    job_pid(fault_db, job_id)
    heroku_stop(pool)
    pool.popen.wait(timeout=25)
    done = fweb.job(job_id)
    assert done["status"] == "finished" and done["attempts"] == 1


# ---------------------------------------------------------------- 3. Redis restarted, Redis away


def test_every_accepted_job_survives_a_redis_restart(fweb, fworkers, fault_redis, fault_db):
    fworkers(count=2)
    accepted: list[str] = []
    refused: list[requests.Response] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        i = 0
        while not stop.is_set():
            i += 1
            try:
                response = session.post(fweb.url("/jobs/log"), json={"message": f"restart {i}"}, timeout=10)
            except requests.ConnectionError:
                continue
            if response.status_code == 202:
                accepted.append(response.json()["id"])
            else:
                refused.append(response)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    wait_until(lambda: len(accepted) > 50, what="some accepted jobs")
    fault_redis.process.send_signal(signal.SIGTERM)  # Redis goes away (it writes its AOF)...
    fault_redis.process.wait(10)
    down = requests.get(fweb.url("/readyz"), timeout=10)
    assert down.status_code == 503
    assert down.json()["error"]["details"]["checks"]["redis"] == "unreachable"
    wait_until(lambda: refused, what="a refused submission")
    time.sleep(2)  # an outage of two seconds, while the clients keep submitting
    fault_redis.start()  # ...and comes back with the same files
    wait_until(lambda: len(accepted) > 150, what="submissions to resume")
    stop.set()
    for thread in clients:
        thread.join()

    assert all(r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable" for r in refused)
    assert all(int(r.headers["Retry-After"]) > 0 for r in refused)
    for job_id in accepted:
        assert fweb.wait_for_status(job_id, {"finished", "failed"})["status"] == "finished"
    assert requests.get(fweb.url("/readyz"), timeout=10).status_code == 200


def test_a_worker_says_once_that_redis_is_away_and_once_that_it_is_back(
    fweb, fworkers, fault_redis, fault_db
):
    """RQ logs every retry (its work loop's and its pub/sub thread's); a worker says it once."""
    worker = fworkers(count=1)
    wait_until(lambda: fault_db.scard("rq:workers") == 1, what="the worker")
    job_id = fweb.post_job("log", {"message": "before"}).json()["id"]
    fweb.wait_for_status(job_id, {"finished"})
    fault_redis.process.send_signal(signal.SIGTERM)
    fault_redis.process.wait(10)
    # Longer than the worker's Redis calls retry (JOB_MONITORING_INTERVAL=1: 6 s), several RQ retries.
    wait_until(lambda: "cannot reach Redis" in worker.output(), what="the worker to say Redis is away")
    time.sleep(8)
    fault_redis.start()
    wait_until(lambda: "answers again" in worker.output(), what="the worker to say Redis is back")
    job_id = fweb.post_job("log", {"message": "after"}).json()["id"]
    assert fweb.wait_for_status(job_id, {"finished"})["status"] == "finished"
    log = worker.output()
    assert log.count("cannot reach Redis") == 1, log[-3000:]
    assert log.count("answers again") == 1
    assert "could not connect to Redis" not in log and "Traceback" not in log, log[-3000:]
    assert f"cannot reach Redis at redis://127.0.0.1:{fault_redis.port}" in log


def restart_at_once(server: EmbeddedRedis) -> None:
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(10)
    server.start()


def pause_for_15_seconds(server: EmbeddedRedis) -> None:
    server.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(15)
    finally:
        server.process.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("outage", [restart_at_once, pause_for_15_seconds])
def test_a_worker_reports_a_quick_restart_and_a_pause_too(fweb, fworkers, fault_redis, fault_db, outage):
    """Calls that ride an outage out with their retries used to leave the log silent."""
    worker = fworkers(count=1)
    wait_until(lambda: fault_db.scard("rq:workers") == 1, what="the worker")
    job_id = fweb.post_job("log", {"message": "before"}).json()["id"]
    fweb.wait_for_status(job_id, {"finished"})
    outage(fault_redis)
    wait_until(lambda: "answers again" in worker.output(), what="the worker to say Redis is back")
    job_id = fweb.post_job("log", {"message": "after"}).json()["id"]
    assert fweb.wait_for_status(job_id, {"finished"})["status"] == "finished"
    log = worker.output()
    assert log.count("cannot reach Redis") == 1, log[-3000:]
    assert log.count("answers again") == 1, log[-3000:]
    assert log.index("cannot reach Redis") < log.index("answers again")
    assert "could not connect to Redis" not in log and "Traceback" not in log, log[-3000:]


def test_a_worker_started_before_redis_waits_for_it(fault_env, fault_redis, tmp_path):
    fault_redis.process.send_signal(signal.SIGTERM)
    fault_redis.process.wait(10)
    worker = start_workers(fault_env, tmp_path, count=1)
    try:
        wait_until(lambda: "cannot reach Redis" in worker.output(), what="the worker to say Redis is away")
        time.sleep(3)
        fault_redis.start()
        wait_until(lambda: "answers again" in worker.output(), what="the worker to find Redis")
        client = redis.Redis.from_url(fault_redis.url)
        wait_until(lambda: client.scard("rq:workers") == 1, what="the worker to register")
        log = worker.output()
        assert log.count("cannot reach Redis") == 1 and "Traceback" not in log, log[-3000:]
    finally:
        worker.kill()


# ---------------------------------------------------------------- 4. An evicting Redis


def test_an_evicting_redis_is_reported_loudly(tmp_path):
    with EmbeddedRedis(tmp_path / "lru", None, False, "--maxmemory-policy", "allkeys-lru") as lru:
        env = base_env(lru.url, tmp_path, SEARCH_WARMUP=0)
        web = WebService(env, tmp_path)
        workers = start_workers(env, tmp_path, count=1)
        try:
            wait_until(lambda: requests.get(web.url("/readyz"), timeout=10).status_code == 200, what="ready")
            ready = requests.get(web.url("/readyz"), timeout=10).json()
            assert ready["checks"]["redis_eviction_policy"] == "allkeys-lru"
            assert any("noeviction" in warning for warning in ready["warnings"])
            wait_until(lambda: "REDIS EVICTS KEYS" in workers.output(), what="the worker's warning")
            assert "REDIS EVICTS KEYS" in web.process.output()
            release = release_check(env)
            assert release.returncode == 1 and "noeviction" in release.stderr
        finally:
            workers.kill()
            web.stop()


def release_check(env: dict[str, str]) -> subprocess.CompletedProcess:
    """The Procfile's `release:` step, as the platform runs it before a deploy."""
    command = ["bash", "-c", f"exec {procfile_command('release')}"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_a_noeviction_redis_raises_no_warning(fweb, fworkers, fault_env):
    assert release_check(fault_env).returncode == 0
    pool = fworkers(count=1)
    wait_until(lambda: requests.get(fweb.url("/readyz"), timeout=10).status_code == 200, what="ready")
    warnings = requests.get(fweb.url("/readyz"), timeout=10).json()["warnings"]
    assert not [warning for warning in warnings if "maxmemory-policy" in warning], warnings
    assert "REDIS EVICTS KEYS" not in pool.output()


# ---------------------------------------------------------------- 5. Between dequeue and start


def pausing_worker(env: dict, tmp_path: Path, worker_class: str, job_class: str, queue_class: str) -> Process:
    command = (
        f"rq worker high default low --worker-class {worker_class} --job-class {job_class} "
        f"--queue-class {queue_class} --serializer json --config jobs.rq_settings"
    )
    return Process("pausing-worker", command, env, tmp_path / "pausing-worker.log")


def test_a_job_taken_by_a_worker_that_dies_before_starting_it_runs(
    fweb, fworkers, fault_env, fault_db, tmp_path
):
    job_id = submit(fweb, "log", {"message": "taken, then orphaned"})
    pausing = pausing_worker(
        fault_env, tmp_path, "tests.fixtures.PausingWorker", "jobs.engine.job.Job", "jobs.engine.queue.Queue"
    )
    try:
        os.kill(
            int(wait_until(lambda: fault_db.get(f"afterward-test:dequeued:{job_id}"), what="the dequeue")),
            signal.SIGKILL,
        )
    finally:
        pausing.kill()
    fworkers(count=1)
    done = fweb.wait_for_status(job_id, {"finished"})
    assert done["attempts"] == 1


def test_stock_rq_loses_a_job_in_that_window(fault_env, fault_redis, fault_db, tmp_path):
    # The same kill with stock RQ's classes: the job is in no queue and no registry, for good.
    queue = RQQueue("default", connection=fault_db, serializer=JSONSerializer)
    job = queue.enqueue("jobs.types.log.write_log", message="lost")
    pausing = pausing_worker(
        fault_env, tmp_path, "tests.fixtures.StockPausingWorker", "rq.job.Job", "rq.Queue"
    )
    try:
        os.kill(
            int(wait_until(lambda: fault_db.get(f"afterward-test:dequeued:{job.id}"), what="the dequeue")),
            signal.SIGKILL,
        )
    finally:
        pausing.kill()
    stock = Process(
        "stock-worker",
        "rq worker high default low --serializer json --config jobs.rq_settings",
        fault_env,
        tmp_path / "stock.log",
    )
    try:
        # A later job runs, so the stock worker is up and dequeuing; the lost one never does.
        probe = queue.enqueue("jobs.types.log.write_log", message="probe")
        wait_until(lambda: status(fault_db, probe.id) == "finished", what="the probe job", process=stock)
        assert status(fault_db, job.id) == "queued"  # what it says; but nothing will ever run it:
        for key in fault_db.scan_iter("rq:*"):
            kind = fault_db.type(key)
            members = (
                fault_db.lrange(key, 0, -1) if kind == b"list"
                else fault_db.zrange(key, 0, -1) if kind == b"zset"
                else []
            )  # fmt: skip
            assert not [m for m in members if job.id.encode() in m], key
    finally:
        stock.kill()


# ---------------------------------------------------------------- 6. Embedding


@pytest.mark.parametrize("pause", ["before_write", "after_write"])
def test_an_embed_worker_killed_mid_job_leaves_each_document_once(fweb, fworkers, fault_db, pause):
    fworkers(count=1, kind="embedder")
    docs = [{"id": f"fault-{pause}-{i}", "text": f"document {i} about {pause}"} for i in range(12)]
    job_id = submit(fweb, "embed_and_pause", {"documents": docs, "pause": pause, "retries": 2})
    horse = psutil.Process(job_pid(fault_db, job_id))
    worker = psutil.Process(horse.ppid())
    for process in (worker, horse):
        process.kill()
    done = fweb.wait_for_status(job_id, {"finished", "failed"})
    assert done["status"] == "finished", done
    assert requests.get(fweb.url("/index"), timeout=10).json()["documents"] == len(docs)
    assert fault_db.hlen("afterward:index:int-ids") == len(docs)
    results = requests.post(fweb.url("/search"), json={"query": "document", "k": 100}, timeout=120).json()
    assert sorted(r["id"] for r in results["results"]) == sorted(d["id"] for d in docs)


def test_recovery_with_the_default_intervals_is_under_a_minute(fault_redis, fault_db, tmp_path):
    # Same kill as above, with the settings a deployment runs with (no test overrides).
    env = base_env(fault_redis.url, tmp_path, SEARCH_WARMUP=0)
    web = WebService(env, tmp_path)
    pool = start_workers(env, tmp_path, count=1)
    try:
        job_id = submit(web, "hold", {"seconds": 600})
        horse = psutil.Process(job_pid(fault_db, job_id))
        worker = psutil.Process(horse.ppid())
        killed_at = time.monotonic()
        for process in (worker, horse):
            process.kill()
        wait_until(
            lambda: status(fault_db, job_id) == "failed", timeout=RECOVERY_TARGET_SECONDS, what="recovery"
        )
        print(f"\ndefault settings: abandoned job failed {time.monotonic() - killed_at:.1f} s after the kill")
        assert web.job(job_id)["error"]["type"] == "WorkerDied"
    finally:
        pool.kill()
        web.stop()


# ---------------------------------------------------------------- 7. Load with faults

# The suite runs 3,000 jobs; FAULT_LOAD_JOBS=10000 is the longer run the README quotes.
LOAD_JOBS = int(os.environ.get("FAULT_LOAD_JOBS", "3000"))
KILL_EVERY = float(os.environ.get("FAULT_KILL_EVERY", "3"))


@pytest.mark.timeout(900)
def test_thousands_of_jobs_while_workers_are_killed(fault_env, fworkers, fault_db, tmp_path):
    fweb = WebService(dict(fault_env, RATE_LIMIT="off"), tmp_path)  # this test is about faults, not limits
    pool = fworkers(count=2)
    ids: list[str] = []
    lock = threading.Lock()
    stop_killing = threading.Event()
    per_client = LOAD_JOBS // 16

    def client(n: int) -> None:
        session = requests.Session()
        for i in range(per_client):
            response = session.post(
                fweb.url("/jobs/log"), json={"message": f"c{n} j{i}", "retries": 3}, timeout=30
            )
            assert response.status_code == 202, response.text
            with lock:
                ids.append(response.json()["id"])

    kills = 0

    def killer() -> None:
        nonlocal kills
        while not stop_killing.wait(KILL_EVERY):
            with suppress(psutil.Error):  # processes come and go meanwhile
                workers = [c for c in psutil.Process(pool.pid).children() if c.is_running()]
                if not workers:
                    continue
                victim = workers[kills % len(workers)]
                for process in [victim, *victim.children(recursive=True)]:
                    process.kill()
                kills += 1

    def all_done() -> bool:
        with lock:
            snapshot = list(ids)
        with fault_db.pipeline(transaction=False) as pipe:
            for job_id in snapshot:
                pipe.hget(f"rq:job:{job_id}", "status")
            return all(s == b"finished" for s in pipe.execute())

    started = time.monotonic()
    killing = threading.Thread(target=killer, daemon=True)
    killing.start()
    clients = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    wait_until(all_done, timeout=max(600, DEADLINE), what="every accepted job to finish", process=pool)
    elapsed = time.monotonic() - started
    stop_killing.set()
    killing.join()
    fweb.stop()

    lines = [line for line in (tmp_path / "jobs.log").read_text().splitlines() if line]
    seen: dict[str, int] = {}
    for line in lines:
        job_id = line.split('"job_id": "', 1)[1][:32]
        seen[job_id] = seen.get(job_id, 0) + 1
    assert len(ids) == 16 * per_client
    assert all(seen.get(job_id, 0) >= 1 for job_id in ids), "a finished job left no line"
    twice = sum(1 for job_id in ids if seen[job_id] > 1)
    print(f"\n{len(ids)} jobs in {elapsed:.0f} s with {kills} worker kills: all finished, {twice} ran twice")
