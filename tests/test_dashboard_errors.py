"""The dashboard's errors are JSON 4xx (and 503 without Redis), never a 500 or a 200 that says "error"."""

from __future__ import annotations

import pytest
from rq.job import JobStatus

from jobs.engine.job import Job
from tests.test_api import assert_error
from tests.test_security import basic, failed_job, make_app

AUTH = basic("ops", "s3cret")


@pytest.fixture
def dashboard(fake_redis, tmp_path):
    return make_app(tmp_path, dashboard_user="ops", dashboard_password="s3cret").test_client()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        # Instances other than 0 (rq-dashboard: LookupError).
        ("GET", "/rq/1/"),
        ("GET", "/rq/99/view/workers"),
        ("GET", "/rq/1/data/queues.json"),
        # Bad page numbers and sizes (ValueError, ZeroDivisionError, Redis "out of range").
        ("GET", "/rq/0/data/jobs/default/failed/8/asc/abc.json"),
        ("GET", "/rq/0/data/jobs/default/failed/0/asc/1.json"),
        ("GET", "/rq/0/data/jobs/default/failed/-1/asc/1.json"),
        ("GET", "/rq/0/data/jobs/default/failed/8/asc/0.json"),
        ("GET", "/rq/0/data/jobs/default/failed/8/asc/-3.json"),
        ("GET", "/rq/0/data/jobs/default/queued/99999999999999999999/asc/1.json"),
        ("GET", "/rq/0/data/jobs/default/queued/8/asc/99999999999999999999.json"),
        ("GET", "/rq/0/data/jobs/default/queued/8/sideways/1.json"),
        ("GET", "/rq/0/view/jobs/default/queued/0/asc/0"),
        # Unknown registries (UnboundLocalError) and queues (emptied or listed as if they were there).
        ("GET", "/rq/0/data/jobs/default/bogus/8/asc/1.json"),
        ("GET", "/rq/0/view/jobs/default/bogus/8/asc/1"),
        ("POST", "/rq/queue/default/bogus/empty"),
        ("GET", "/rq/0/data/jobs/nope/queued/8/asc/1.json"),
        ("POST", "/rq/queue/nope/queued/empty"),
        ("POST", "/rq/requeue/nope"),
        ("POST", "/rq/queue/nope/compact"),
        # Job ids RQ refuses (ValueError).
        ("GET", "/rq/0/view/job/bad%20id"),
        ("GET", "/rq/0/data/job/bad%20id.json"),
        ("POST", "/rq/job/bad%20id/delete"),
        ("POST", "/rq/job/bad%20id/requeue"),
    ],
)
def test_what_the_dashboard_does_not_have_is_404(dashboard, method, path):
    assert_error(dashboard.open(path, method=method, headers=AUTH), 404)


def test_requeue_of_a_job_that_did_not_fail_is_409(dashboard, fake_redis):
    job_id = failed_job(dashboard)  # queued: it never ran
    error = assert_error(dashboard.post(f"/rq/job/{job_id}/requeue", headers=AUTH), 409, "conflict")
    assert "queued" in error["message"]
    job = Job.fetch(job_id, connection=fake_redis)
    with fake_redis.pipeline() as pipe:
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        pipe.execute()
    error = assert_error(dashboard.post(f"/rq/job/{job_id}/requeue", headers=AUTH), 409, "conflict")
    assert "finished" in error["message"]


def test_compacting_an_empty_queue_does_nothing(dashboard, fake_redis):
    response = dashboard.post("/rq/queue/low/compact", headers=AUTH)
    assert response.status_code == 200 and response.get_json() == {"status": "OK"}
    job_id = failed_job(dashboard)
    assert dashboard.post("/rq/queue/default/compact", headers=AUTH).get_json() == {"status": "OK"}
    assert fake_redis.lrange("rq:queue:default", 0, -1) == [job_id.encode()]


def test_the_pages_it_has_still_answer(dashboard):
    failed_job(dashboard)
    for path in (
        "/rq/",
        "/rq/0/view/jobs",
        "/rq/0/view/jobs/default/queued/8/asc/1",
        "/rq/0/data/jobs/default/queued/200/dsc/1.json",
        "/rq/0/data/jobs/embed-low/canceled/8/asc/3.json",
    ):
        assert dashboard.get(path, headers=AUTH).status_code == 200, path


@pytest.mark.parametrize("path", ["/rq/", "/rq/0/view/workers", "/rq/0/data/queues.json"])
def test_without_redis_the_dashboard_answers_503(dashboard, fake_redis, path):
    fake_redis.connection_pool.connection_kwargs["server"].connected = False
    response = dashboard.get(path, headers=AUTH)
    assert_error(response, 503, "redis_unavailable")
    assert response.headers["Retry-After"]
    assert response.headers["X-Frame-Options"] == "DENY"
