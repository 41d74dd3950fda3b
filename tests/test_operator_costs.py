"""Operator endpoints cost what the caller owns, not what every tenant holds; retries wait in
the key's share like new jobs (fakeredis; the figures at 100k failed jobs: bench.operators)."""

from __future__ import annotations

import pytest
from rq.job import JobStatus

import service.state
from jobs import quota
from jobs.engine.job import Job
from service.waiting import JobWaiter
from tests.test_security import KEY_A, KEY_B, make_app

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture
def keyed(fake_redis, tmp_path, monkeypatch):
    monkeypatch.setattr(JobWaiter, "_ensure_listener", lambda self: None)
    return make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off", key_max_waiting=3).test_client()


def submit(client, headers: dict, body: dict | None = None) -> str:
    response = client.post("/jobs/log", json=body or {"message": "x"}, headers=headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def fail(fake_redis, job_id: str, status: JobStatus = JobStatus.FAILED) -> None:
    """End a queued job as if a worker had taken it and it failed: off its queue, its key's turn
    and its key's share, then its status and RQ's failure record."""
    job = Job.fetch(job_id, connection=fake_redis)
    job.cancel()
    with fake_redis.pipeline() as pipe:
        quota.release(pipe, job.meta["owner"], job.id)
        job.set_status(status, pipeline=pipe)
        job._handle_failure(f"{status.value}: as a test ends it", pipe)
        pipe.execute()


def commands_run(connection) -> int:
    """Commands Redis has run so far, those of scripts included."""
    return sum(stats["calls"] for stats in connection.info("commandstats").values())


@pytest.mark.integration
def test_bulk_retry_and_queues_cost_the_same_whatever_other_keys_failed(real_redis, tmp_path, monkeypatch):
    monkeypatch.setattr(service.state, "connect_redis", lambda settings: real_redis)
    monkeypatch.setattr(JobWaiter, "_ensure_listener", lambda self: None)
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()

    def cost(call) -> int:
        before = commands_run(real_redis)
        call()
        return commands_run(real_redis) - before - 1  # less the INFO that measured

    def costs() -> tuple[int, int]:
        retry = cost(lambda: client.post("/jobs/retry", json={}, headers=A).get_json())
        queues = cost(lambda: client.get("/queues", headers=A).get_json())
        return retry, queues

    costs()  # scripts loaded, server version read
    before = costs()
    for status in [JobStatus.FAILED, JobStatus.STOPPED] * 1000:
        fail(real_redis, submit(client, B), status)
    counts = client.get("/queues", headers=A).get_json()["queues"][1]["counts"]
    assert (counts["failed"], counts["stopped"]) == (1000, 1000)
    after = costs()
    # Key A has no failed job: its bulk retry reads its own empty index, and the queue listing
    # reads counts; neither walks key B's 2,000 jobs (the former versions read each of them).
    assert abs(after[0] - before[0]) <= 5 and abs(after[1] - before[1]) <= 5, (before, after)


def test_queues_counts_stopped_jobs_apart(keyed, fake_redis):
    stopped, failed = submit(keyed, A), submit(keyed, A)
    fail(fake_redis, stopped, JobStatus.STOPPED)
    fail(fake_redis, failed, JobStatus.FAILED)
    counts = keyed.get("/queues", headers=A).get_json()["queues"][1]["counts"]
    assert (counts["failed"], counts["stopped"]) == (1, 1)
    # A retried job leaves both counts.
    assert keyed.post(f"/jobs/{stopped}/retry", headers=A).status_code == 202
    counts = keyed.get("/queues", headers=A).get_json()["queues"][1]["counts"]
    assert (counts["failed"], counts["stopped"], counts["queued"]) == (1, 0, 1)


def test_a_retry_takes_a_place_in_the_keys_share_like_a_new_job(keyed, fake_redis):
    first, second = submit(keyed, A), submit(keyed, A)
    fail(fake_redis, first)
    fail(fake_redis, second)
    waiting = [submit(keyed, A, {"message": "later", "delay": 600}) for _ in range(3)]  # the share is full
    refused = keyed.post(f"/jobs/{first}/retry", headers=A)
    assert refused.status_code == 429, refused.get_json()
    assert refused.get_json()["error"]["code"] == "quota_exceeded"
    bulk = keyed.post("/jobs/retry", json={}, headers=A)
    assert bulk.status_code == 429 and bulk.get_json()["error"]["code"] == "quota_exceeded"
    assert keyed.get(f"/jobs/{first}", headers=A).get_json()["status"] == "failed"  # left as it was
    keyed.delete(f"/jobs/{waiting[0]}", headers=A)
    answer = keyed.post("/jobs/retry", json={}, headers=A)
    assert answer.status_code == 202
    assert answer.get_json() == {"retried": 1, "job_ids": [first], "more": True}  # room for one
    assert keyed.get(f"/jobs/{first}", headers=A).get_json()["status"] == "queued"
    assert keyed.post(f"/jobs/{second}/retry", headers=A).status_code == 429
