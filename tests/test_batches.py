"""Jobs an embedder takes together: one start, one run, one finish, and still one outcome each.

The `note` job type (tests.fixtures) runs in the embed family and can run many jobs in one
call, the way embed jobs do. Jobs are queued before the embedder starts, so its first
dequeue finds them all waiting.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

import psutil
import pytest
from rq.job import Job as RQJob
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from tests.support import Process, WebService, start_workers, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def embedder(env: dict[str, str], proc_dir) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(**extra: str) -> Process:
        process = start_workers(dict(env, **extra), proc_dir, count=1, kind="embedder")
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def submit_notes(web: WebService, bodies: list[dict]) -> list[str]:
    ids = []
    for body in bodies:
        response = web.post_job("note", body)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def ended(web: WebService, ids: list[str]) -> list[dict]:
    return [web.wait_for_status(job_id, {"finished", "failed", "stopped"}) for job_id in ids]


def test_jobs_queued_together_run_together_and_end_one_by_one(web, embedder, real_redis):
    ids = submit_notes(web, [{"value": i} for i in range(5)])
    embedder()
    views = ended(web, ids)
    assert [view["status"] for view in views] == ["finished"] * 5
    assert [view["result"] for view in views] == [{"value": i, "together": 5} for i in range(5)]
    assert all(view["attempts"] == 1 and view["started_at"] and view["ended_at"] for view in views)
    # RQ's own records, as for any job: what rq-dashboard and `rq info` read.
    registry = FinishedJobRegistry("embed-default", connection=real_redis, serializer=JSONSerializer)
    assert sorted(registry.get_job_ids()) == sorted(ids)
    for job_id in ids:
        job = RQJob.fetch(job_id, connection=real_redis, serializer=JSONSerializer)
        assert job.get_status() == "finished"
        assert job.latest_result().return_value["together"] == 5
    assert not real_redis.keys("rq:execution:*"), "every execution is cleaned up"
    assert real_redis.llen("rq:queue:embed-default:intermediate") == 0


def test_a_bad_input_fails_its_own_job_and_not_its_neighbours(web, embedder):
    ids = submit_notes(web, [{"value": 0}, {"value": 1, "fail": True}, {"value": 2}])
    embedder()
    views = ended(web, ids)
    assert [view["status"] for view in views] == ["finished", "failed", "finished"]
    assert views[1]["error"] == {"type": "ValueError", "message": "bad value 1"}
    # The batch failed as a whole; each job then ran on its own.
    assert [views[0]["result"], views[2]["result"]] == [
        {"value": 0, "together": 1},
        {"value": 2, "together": 1},
    ]


def test_stopping_one_job_of_a_batch_puts_the_others_back(web, embedder, real_redis):
    ids = submit_notes(web, [{"value": i, "hold": 600} for i in range(3)])
    embedder()
    pid = int(wait_until(lambda: real_redis.get("afterward-test:note-pid"), what="the batch to start"))
    assert [web.job(job_id)["status"] for job_id in ids] == ["started"] * 3
    response = web.http.delete(web.url(f"/jobs/{ids[1]}"))
    assert response.status_code == 200, response.text
    views = ended(web, ids)
    assert [view["status"] for view in views] == ["finished", "stopped", "finished"]
    # The two others ran again, together, with no failure counted against them.
    assert [views[0]["result"], views[2]["result"]] == [
        {"value": 0, "together": 2},
        {"value": 2, "together": 2},
    ]
    assert views[0]["attempts"] == views[2]["attempts"] == 2
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_shutdown_mid_batch_puts_every_job_back(web, embedder, real_redis):
    ids = submit_notes(web, [{"value": i, "hold": 600} for i in range(3)])
    pool = embedder(SHUTDOWN_GRACE="1")
    wait_until(lambda: real_redis.get("afterward-test:note-pid"), what="the batch to start")
    pool.signal(signal.SIGTERM)
    pool.popen.wait(timeout=60)
    assert [web.job(job_id)["status"] for job_id in ids] == ["queued"] * 3
    assert real_redis.lrange("rq:queue:embed-default", 0, -1) == [job_id.encode() for job_id in ids]
    embedder()
    views = ended(web, ids)
    assert [view["status"] for view in views] == ["finished"] * 3
    assert [view["result"]["together"] for view in views] == [3, 3, 3]


def test_a_worker_killed_mid_batch_loses_none_of_its_jobs(web, embedder, real_redis):
    ids = submit_notes(web, [{"value": i, "hold": 600, "retries": 1} for i in range(3)])
    pool = embedder(MAINTENANCE_INTERVAL="2")
    pid = int(wait_until(lambda: real_redis.get("afterward-test:note-pid"), what="the batch to start"))
    horse = psutil.Process(pid)
    worker = psutil.Process(horse.ppid())
    worker.kill()
    views = ended(web, ids)
    assert [view["status"] for view in views] == ["finished"] * 3, views
    assert all(view["attempts"] == 2 for view in views)
    assert pool.popen.poll() is None, "the pool replaced its worker"
