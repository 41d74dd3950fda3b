"""What a job's requests cost the web process in Redis: the commands and round trips of each.

Each test pins the exact commands a request sends, one list per round trip, so a change that
adds a command or splits a pipeline fails here and says where.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from redis.connection import AbstractConnection
from rq.job import JobStatus
from rq.results import Result

from jobs import keys
from jobs.engine.job import Job
from service.state import get_state
from service.waiting import JobWaiter
from tests.test_security import KEY_A, make_app

A = {"Authorization": f"Bearer {KEY_A}"}
# With API keys every job goes through its key's fair share (jobs.engine.fair): the job is
# saved, then one script queues it (or puts it behind its key's job on the queue) and signals
# an idle worker; then its index entry and its count.
ENQUEUE = ["MULTI", "SADD", "HSET", "HSET", "EVAL", "ZADD", "HINCRBY", "EXEC"]
RATE_LIMIT = ["INCRBY", "EXPIRE"]


def command_names(packed: bytes | list) -> list[str]:
    """The names of the commands in one packed write (RESP arrays of bulk strings)."""
    data = b"".join(bytes(chunk) for chunk in packed) if isinstance(packed, list) else bytes(packed)
    names, at = [], 0
    while at < len(data):
        assert data[at : at + 1] == b"*"
        end = data.index(b"\r\n", at)
        count, at = int(data[at + 1 : end]), end + 2
        for position in range(count):
            end = data.index(b"\r\n", at)
            length = int(data[at + 1 : end])
            if position == 0:
                names.append(data[end + 2 : end + 2 + length].decode().upper())
            at = end + 2 + length + 2
    return names


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """This thread's writes to Redis from now on, as the commands they carried: one list per round trip."""
    sent: list[list[str]] = []
    send = AbstractConnection.send_packed_command
    test_thread = threading.get_ident()

    def record(self, command, check_health=True):
        if threading.get_ident() == test_thread:
            sent.append(command_names(command))
        return send(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", record)
    yield sent


@pytest.fixture
def keyed(fake_redis, tmp_path, monkeypatch):
    # The waiter's pub/sub listener would outlive the test: tests announce job ends themselves.
    monkeypatch.setattr(JobWaiter, "_ensure_listener", lambda self: None)
    return make_app(tmp_path, api_keys=(KEY_A,), rate_limit="100 per minute").test_client()


def submit(client, **headers) -> str:
    response = client.post("/jobs/log", json={"message": "x"}, headers={**A, **headers})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def finish(fake_redis, job_id: str, value: object) -> None:
    """What a worker records when the job returns `value`."""
    job = Job.fetch(job_id, connection=fake_redis)
    Result.create(job, Result.Type.SUCCESSFUL, ttl=60, return_value=value)
    job.set_status(JobStatus.FINISHED)


def test_submit_with_an_idempotency_key_is_two_round_trips(keyed, round_trips):
    warm_up(keyed, round_trips)
    submit(keyed, **{"Idempotency-Key": "order-1"})
    # The rate-limit hit rides with the key's claim; the job, its index entry and its count
    # are one transaction (and one submission in 16 also trims the index).
    # The job's place in its key's share (EVAL, jobs.quota) rides along too.
    first = [*RATE_LIMIT, "SET", "EVAL"]
    assert round_trips in ([first, ENQUEUE], [first, with_trim(ENQUEUE)])


def test_submit_without_a_key_is_two_round_trips(keyed, round_trips):
    warm_up(keyed, round_trips)
    submit(keyed)
    # With API keys the hit travels with the job's place in its key's share (jobs.quota).
    assert round_trips in ([[*RATE_LIMIT, "EVAL"], ENQUEUE], [[*RATE_LIMIT, "EVAL"], with_trim(ENQUEUE)])


def warm_up(client, round_trips: list) -> None:
    """A queue asks Redis its version once, on its first job."""
    submit(client)
    round_trips.clear()


def with_trim(commands: list[str]) -> list[str]:
    return [*commands[:-2], "ZREMRANGEBYSCORE", *commands[-2:]]


def make_owner() -> str:
    from service.security import key_owner

    return key_owner(KEY_A)


def test_reading_a_job_is_one_round_trip(keyed, fake_redis, round_trips):
    job_id = submit(keyed)
    finish(fake_redis, job_id, {"done": True})
    round_trips.clear()
    view = keyed.get(f"/jobs/{job_id}", headers=A).get_json()
    assert view["status"] == "finished" and view["result"] == {"done": True}
    assert round_trips == [[*RATE_LIMIT, "HGETALL", "XREVRANGE"]]


def test_a_long_poll_reads_the_job_once_before_and_once_after_its_end(keyed, fake_redis, round_trips):
    job_id = submit(keyed)
    waiter = get_state_of(keyed).waiter

    def end_it() -> None:
        deadline = time.monotonic() + 10
        while job_id not in waiter._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        finish(fake_redis, job_id, [1, 2])
        waiter.notify(job_id)

    ender = threading.Thread(target=end_it)
    ender.start()
    round_trips.clear()
    view = keyed.get(f"/jobs/{job_id}?wait=10", headers=A).get_json()
    ender.join()
    assert view["status"] == "finished" and view["result"] == [1, 2]
    assert round_trips == [[*RATE_LIMIT, "HGETALL", "XREVRANGE"], ["HGETALL", "XREVRANGE"]]


def test_a_long_poll_on_an_ended_job_answers_at_once(keyed, fake_redis, round_trips):
    job_id = submit(keyed)
    finish(fake_redis, job_id, "ok")
    round_trips.clear()
    started = time.monotonic()
    view = keyed.get(f"/jobs/{job_id}?wait=30", headers=A).get_json()
    assert time.monotonic() - started < 5
    assert view["result"] == "ok"
    # The result comes with the job: one round trip, as a plain read.
    assert round_trips == [[*RATE_LIMIT, "HGETALL", "XREVRANGE"]]


def test_errors_before_any_redis_call_still_count_against_the_limit(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="2 per minute").test_client()
    assert client.get("/jobs/not-an-id", headers=A).status_code == 404
    assert client.post("/jobs/log", json={}, headers={**A, "Idempotency-Key": "k"}).status_code == 422
    # Both were counted: the next request of any kind is refused, whatever else is wrong with it.
    for response in (
        client.get("/jobs/not-an-id", headers=A),
        client.get("/jobs/" + "a" * 32, headers=A),
        client.post("/jobs/log", json={}, headers={**A, "Idempotency-Key": "k"}),
        client.post("/jobs/log", json={"message": "x"}, headers={**A, "Idempotency-Key": "k"}),
    ):
        assert response.status_code == 429, response.get_json()
        assert 0 < int(response.headers["Retry-After"]) <= 60


def test_a_refused_submit_leaves_its_idempotency_key_free(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="1 per minute").test_client()
    assert client.get("/jobs", headers=A).status_code == 200
    refused = client.post("/jobs/log", json={"message": "x"}, headers={**A, "Idempotency-Key": "k"})
    assert refused.status_code == 429
    assert fake_redis.get(keys.idempotency(make_owner(), "k")) is None
    assert not fake_redis.keys("rq:job:*")


def get_state_of(client):
    with client.application.app_context():
        return get_state()
