"""Running failed jobs again in bulk (POST /jobs/retry) and from the dashboard, reset as one retry is."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests

from tests.support import WebService
from tests.test_security import KEY_A, KEY_B

pytestmark = pytest.mark.integration

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture
def keyed_web(env, proc_dir) -> Iterator[WebService]:
    web = WebService(dict(env, API_KEYS=f"{KEY_A},{KEY_B}", RATE_LIMIT="off"), proc_dir)
    web.http.headers.update(A)
    yield web
    web.stop()


def submit(web: WebService, headers: dict, type_name: str, body: dict) -> str:
    response = requests.post(web.url(f"/jobs/{type_name}"), json=body, headers=headers, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def bulk_retry(web: WebService, headers: dict, body: dict) -> requests.Response:
    return requests.post(web.url("/jobs/retry"), json=body, headers=headers, timeout=60)


def test_bulk_retry_requeues_only_the_callers_matching_failed_jobs(keyed_web, workers):
    web = keyed_web
    workers(count=1)
    flaky_default = [submit(web, A, "flaky", {"failures": 1}) for _ in range(2)]
    flaky_low = submit(web, A, "flaky", {"failures": 1, "queue": "low"})
    timed_out = submit(web, A, "hold", {"seconds": 60, "timeout": 1})  # fails once, then ends at once
    done = submit(web, A, "log", {"message": "never failed"})
    theirs = submit(web, B, "flaky", {"failures": 1})
    mine = [*flaky_default, flaky_low, timed_out]
    for job_id in mine:
        assert web.wait_for_status(job_id, {"failed"})["error"] is not None
    web.wait_for_status(done, {"finished"})
    requests.get(web.url(f"/jobs/{theirs}"), headers=B, params={"wait": 30}, timeout=60)

    # Nothing ended after a time still to come: 200, nothing queued.
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    answer = bulk_retry(web, A, {"since": later})
    assert answer.status_code == 200
    assert answer.json() == {"retried": 0, "job_ids": [], "more": False}

    answer = bulk_retry(web, A, {"type": "flaky", "queue": "low"})
    assert answer.status_code == 202
    assert answer.json() == {"retried": 1, "job_ids": [flaky_low], "more": False}

    answer = bulk_retry(web, A, {"type": "flaky", "limit": 1, "since": "2000-01-01T00:00:00Z"}).json()
    assert answer["retried"] == 1 and answer["more"] is True
    (first,) = answer["job_ids"]
    assert first in flaky_default

    answer = bulk_retry(web, A, {}).json()  # the rest: the other flaky job and the timed-out one
    assert answer["more"] is False
    assert sorted(answer["job_ids"]) == sorted(set(mine) - {flaky_low, first})
    for job_id in mine:
        view = web.wait_for_status(job_id, {"finished"})
        assert view["error"] is None and view["retries_left"] == 0
    # The other key's failed job was never touched, and its own bulk retry finds only it.
    their_view = requests.get(web.url(f"/jobs/{theirs}"), headers=B, timeout=30).json()
    assert their_view["status"] == "failed"
    assert bulk_retry(web, B, {}).json() == {"retried": 1, "job_ids": [theirs], "more": False}
    assert bulk_retry(web, A, {}).json()["retried"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "finished"}, "status"),
        ({"queue": "urgent"}, "queue"),
        ({"type": "no-such-type"}, "type"),
        ({"since": "yesterday"}, "since"),
        ({"since": 1700000000}, "since"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "5"}, "limit"),
        ({"owner": "someone-else"}, "owner"),
    ],
)
def test_a_bad_filter_is_422(web, body, field):
    answer = requests.post(web.url("/jobs/retry"), json=body, timeout=30)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "validation_failed"
    assert [item["field"] for item in error["details"]] == [field]


def test_a_dashboard_requeue_clears_error_and_progress(web, workers, real_redis):
    pool = workers(count=1)
    # Timed out while reporting progress: both an error and a progress to clear.
    ids = [web.post_job("sleep", {"seconds": 60, "timeout": 2}).json()["id"] for _ in range(2)]
    for job_id in ids:
        failed = web.wait_for_status(job_id, {"failed"})
        assert failed["error"]["type"] == "JobTimeout" and failed["progress"] is not None
    pool.kill()  # nothing runs the requeued jobs: what the view shows is the reset alone

    assert requests.post(web.url(f"/rq/job/{ids[0]}/requeue"), timeout=10).status_code == 200
    view = web.job(ids[0])
    assert view["status"] == "queued"
    assert view["error"] is None and view["progress"] is None

    requeued = requests.post(web.url("/rq/requeue/default"), timeout=10)  # the "requeue all" button
    assert requeued.status_code == 200 and requeued.json()["count"] == 1
    view = web.job(ids[1])
    assert view["status"] == "queued"
    assert view["error"] is None and view["progress"] is None


def test_stopped_jobs_are_retried_when_asked_for(web, workers):
    workers(count=1)
    job_id = web.post_job("sleep", {"seconds": 60}).json()["id"]
    web.wait_for_status(job_id, {"started"})
    web.http.delete(web.url(f"/jobs/{job_id}"), timeout=30)
    web.wait_for_status(job_id, {"stopped"})
    assert requests.post(web.url("/jobs/retry"), json={}, timeout=30).json()["retried"] == 0  # failed only
    answer = requests.post(web.url("/jobs/retry"), json={"status": "stopped"}, timeout=30)
    assert answer.status_code == 202 and answer.json()["job_ids"] == [job_id]
    assert web.job(job_id)["status"] in {"queued", "started"}
