"""The job view tells the truth: when a scheduled job runs, when a canceled one ended, which
queue a job is on, and that a stopped job is not a failed one."""

from __future__ import annotations

from datetime import timedelta

import pytest
from rq.job import JobStatus

from jobs.engine.job import Job
from jobs.times import parse_iso
from service.dashboard import describe
from tests.test_api import assert_error, post


def test_a_delayed_job_says_when_it_will_run(client):
    view = post(client, "log", {"message": "later", "delay": 90}).get_json()
    assert view["status"] == "scheduled"
    due = parse_iso(view["scheduled_for"]) - parse_iso(view["created_at"])
    assert timedelta(seconds=89) <= due <= timedelta(seconds=91)
    assert client.get(f"/jobs/{view['id']}").get_json()["scheduled_for"] == view["scheduled_for"]
    (listed,) = client.get("/jobs").get_json()["jobs"]
    assert listed["scheduled_for"] == view["scheduled_for"]


def test_a_job_that_is_not_scheduled_has_no_time(client):
    view = post(client, "log", {"message": "now"}).get_json()
    assert view["status"] == "queued"
    assert view["scheduled_for"] is None
    assert client.get(f"/jobs/{view['id']}").get_json()["scheduled_for"] is None


def test_a_waiting_retry_says_when_it_will_run(client, fake_redis):
    # What a failed attempt with retries left leaves behind: the job scheduled in its queue's
    # registry, scored by the end of its back-off.
    view = post(client, "log", {"message": "flaky", "retries": 2}).get_json()
    fake_redis.lrem("rq:queue:default", 0, view["id"])
    fake_redis.hset(f"rq:job:{view['id']}", "status", "scheduled")
    fake_redis.zadd("rq:scheduled:default", {view["id"]: 2_000_000_000})
    again = client.get(f"/jobs/{view['id']}").get_json()
    assert again["status"] == "scheduled"
    assert again["scheduled_for"] == "2033-05-18T03:33:20.000Z"
    assert (
        client.get("/jobs?status=scheduled").get_json()["jobs"][0]["scheduled_for"] == again["scheduled_for"]
    )


def test_a_canceled_job_has_ended(client):
    view = post(client, "log", {"message": "never", "delay": 60}).get_json()
    assert view["ended_at"] is None
    canceled = client.delete(f"/jobs/{view['id']}").get_json()
    assert canceled["status"] == "canceled"
    assert canceled["scheduled_for"] is None
    assert canceled["ended_at"] is not None
    assert parse_iso(canceled["ended_at"]) >= parse_iso(canceled["created_at"])
    assert client.get(f"/jobs/{view['id']}").get_json()["ended_at"] == canceled["ended_at"]


def end(fake_redis, job_id: str, status: JobStatus = JobStatus.STOPPED, queue: str = "default") -> None:
    """End a job as a worker's failure handler does: its status, then RQ's failure record."""
    fake_redis.lrem(f"rq:queue:{queue}", 0, job_id)
    job = Job.fetch(job_id, connection=fake_redis)
    with fake_redis.pipeline() as pipe:
        job.set_status(status, pipeline=pipe)
        job._handle_failure(f"{status.value}: as a test ends it", pipe)
        pipe.execute()


def test_a_stopped_job_is_counted_and_listed_as_stopped_not_failed(client, fake_redis):
    stopped = post(client, "log", {"message": "stopped"}).get_json()["id"]
    failed = post(client, "log", {"message": "failed"}).get_json()["id"]
    end(fake_redis, stopped)
    end(fake_redis, failed, JobStatus.FAILED)

    default = next(q for q in client.get("/queues").get_json()["queues"] if q["name"] == "default")
    assert (default["counts"]["failed"], default["counts"]["stopped"]) == (1, 1)
    assert [job["id"] for job in client.get("/jobs?status=failed").get_json()["jobs"]] == [failed]
    assert [job["id"] for job in client.get("/jobs?status=stopped").get_json()["jobs"]] == [stopped]
    assert describe(Job.fetch(stopped, connection=fake_redis)).startswith("[stopped] ")
    assert not describe(Job.fetch(failed, connection=fake_redis)).startswith("[stopped]")


def test_an_embed_job_reports_the_queue_it_is_on(client):
    embed = post(client, "embed", {"text": "hello", "queue": "low"}).get_json()
    log = post(client, "log", {"message": "x", "queue": "low"}).get_json()
    assert (embed["queue"], log["queue"]) == ("embed-low", "low")
    names = [queue["name"] for queue in client.get("/queues").get_json()["queues"]]
    assert embed["queue"] in names and log["queue"] in names
    assert [job["id"] for job in client.get("/jobs?queue=embed-low").get_json()["jobs"]] == [embed["id"]]
    assert [job["id"] for job in client.get("/jobs?queue=low").get_json()["jobs"]] == [log["id"]]
    assert_error(client.get("/jobs?queue=embed"), 422, "validation_failed")


@pytest.mark.parametrize(
    "ended", [JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED]
)
def test_delete_of_any_ended_job_is_409_and_changes_nothing(client, fake_redis, ended):
    view = post(client, "log", {"message": "x"}).get_json()
    fake_redis.hset(f"rq:job:{view['id']}", "status", ended.value)
    error = assert_error(client.delete(f"/jobs/{view['id']}"), 409, "conflict")
    assert ended.value in error["message"]
    assert client.get(f"/jobs/{view['id']}").get_json()["status"] == ended.value


@pytest.mark.integration
@pytest.mark.parametrize("job", [("sleep", {"seconds": 3}), ("log", {"message": "batched"})])
def test_started_at_never_moves(web, workers, job):
    workers(count=1)
    type_name, body = job
    view = web.post_job(type_name, body).json()
    seen = set()
    while (now := web.job(view["id"]))["status"] not in ("finished", "failed"):
        if now["started_at"] is not None:
            seen.add(now["started_at"])
    finished = web.wait_for_status(view["id"], {"finished"})
    seen.add(finished["started_at"])
    for _ in range(3):
        seen.add(web.job(view["id"])["started_at"])
    assert len(seen) == 1, seen
    assert parse_iso(finished["started_at"]) <= parse_iso(finished["ended_at"])
