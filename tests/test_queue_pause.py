"""Pausing a queue on the real stack: gunicorn, `rq worker-pool` and Redis (jobs.engine.pause)."""

from __future__ import annotations

import time

import pytest

from jobs.times import parse_iso
from service.workers import live_workers
from tests.support import WebService, wait_until

pytestmark = pytest.mark.integration


def submit(web: WebService, type_name: str, body: dict) -> str:
    response = web.post_job(type_name, body)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return response.json()["id"]


def act(web: WebService, queue: str, action: str) -> tuple[dict, float, float]:
    """Pause or resume `queue`; its state, and when the call was made and when it returned."""
    before = time.time()
    response = web.http.post(web.url(f"/queues/{queue}/{action}"), timeout=30)
    after = time.time()
    assert response.status_code == 200, response.text
    return response.json(), before, after


def at(text: str | None) -> float | None:
    return None if text is None else parse_iso(text).timestamp()


def test_a_paused_queue_holds_its_jobs_while_the_others_run(web, workers, real_redis):
    workers(count=2)
    wait_until(lambda: len(live_workers(real_redis)) >= 2, what="two live workers")
    running = submit(web, "hold", {"seconds": 4})
    web.wait_for_status(running, {"started"})

    state, _, paused = act(web, "default", "pause")
    assert state["paused"] is True
    # Submissions are accepted while paused, and wake the idle worker, which must pass them over.
    held = [submit(web, "log", {"message": f"held {i}"}) for i in range(3)]
    # Lower priority than `default`, submitted after its jobs: it runs only if they are passed over.
    behind = submit(web, "log", {"message": "on low", "queue": "low"})
    ahead = submit(web, "log", {"message": "on high", "queue": "high"})
    for job_id in (behind, ahead):
        web.wait_for_status(job_id, {"finished"})

    # The job that was running when the pause landed runs to its end.
    done = web.wait_for_status(running, {"finished"})
    assert at(done["started_at"]) < paused < at(done["ended_at"])
    # Both workers are idle now, with default's jobs in front of them: none was taken.
    wait_until(
        lambda: all(worker["state"] == "idle" for worker in _workers(web, "default")), what="idle workers"
    )
    for job_id in held:
        view = web.job(job_id)
        assert view["status"] == "queued" and view["started_at"] is None, view
    default = _queue(web, "default")
    assert default["paused"] is True and default["counts"]["queued"] == 3
    assert not any(queue["paused"] for queue in web.http.get(web.url("/queues"), timeout=30).json()["queues"]
                   if queue["name"] != "default")  # fmt: skip

    state, resumed, _ = act(web, "default", "resume")
    assert state["paused"] is False and _queue(web, "default")["paused"] is False
    for job_id in held:
        view = web.wait_for_status(job_id, {"finished"})
        assert at(view["started_at"]) > resumed


def test_pausing_twice_keeps_the_first_pause(web, real_redis):
    first, _, _ = act(web, "embed-low", "pause")
    again, _, _ = act(web, "embed-low", "pause")
    assert again == first and first["paused_by"] == "public"  # the session's web process has no API_KEYS
    missing = web.http.post(web.url("/queues/nowhere/pause"), timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    act(web, "embed-low", "resume")


def _queue(web: WebService, name: str) -> dict:
    queues = web.http.get(web.url("/queues"), timeout=30).json()["queues"]
    return next(queue for queue in queues if queue["name"] == name)


def _workers(web: WebService, name: str) -> list[dict]:
    return _queue(web, name)["workers"]
