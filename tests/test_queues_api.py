"""GET /queues: what operators reach for first, as in `rq info`, Flower or bull-board."""

from __future__ import annotations

import pytest

from tests.support import wait_until
from tests.test_security import KEY_A, make_app

QUEUES = ["high", "default", "low", "embed-high", "embed-default", "embed-low"]


def test_every_queue_is_listed_and_the_listing_needs_a_key(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="off").test_client()
    assert client.get("/queues").status_code == 401
    answer = client.get("/queues", headers={"Authorization": f"Bearer {KEY_A}"}).get_json()
    assert [queue["name"] for queue in answer["queues"]] == QUEUES
    assert [queue["process_type"] for queue in answer["queues"]] == ["worker"] * 3 + ["embedder"] * 3
    empty = {
        "queued": 0,
        "started": 0,
        "scheduled": 0,
        "deferred": 0,
        "failed": 0,
        "stopped": 0,
        "finished": 0,
    }
    assert all(
        queue["counts"] == empty and queue["oldest_queued_seconds"] is None for queue in answer["queues"]
    )


@pytest.mark.integration
def test_counts_and_workers_of_a_busy_queue(web, workers, real_redis):
    workers(count=1)
    wait_until(lambda: real_redis.scard("rq:workers") >= 1, what="the worker")
    running = web.post_job("hold", {"seconds": 60}).json()["id"]
    wait_until(lambda: web.job(running)["status"] == "started", what="the job to start")
    waiting = web.post_job("log", {"message": "behind the long one"}).json()["id"]
    delayed = web.post_job("log", {"message": "later", "delay": 600}).json()["id"]
    default = next(
        q for q in web.http.get(web.url("/queues"), timeout=30).json()["queues"] if q["name"] == "default"
    )
    assert default["counts"]["started"] == 1
    assert default["counts"]["queued"] == 1
    assert default["counts"]["scheduled"] == 1
    assert default["oldest_queued_seconds"] is not None and default["oldest_queued_seconds"] >= 0
    (worker,) = default["workers"]
    assert worker["state"] == "busy" and worker["current_jobs"] == [running]
    assert {waiting, delayed}.isdisjoint(worker["current_jobs"])
