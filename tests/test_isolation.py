"""What one job can leave to the next in the same worker, with real workers and work-horses.

The documented promise: after a job that did not succeed, or that leaves too much behind, the
next job runs in a fresh fork of the worker; after any job, the working directory, the
environment, the umask and signal handlers are put back.
"""

from __future__ import annotations

import json
import signal
from unittest.mock import ANY

import pytest
from rq import Callback
from rq import Queue as RQQueue
from rq.serializers import JSONSerializer

from tests.support import ROOT, WebService, wait_until

pytestmark = pytest.mark.integration


def run(web: WebService, type_name: str, body: dict, expect: str = "finished") -> dict:
    response = web.post_job(type_name, body)
    assert response.status_code == 202, response.text
    view = web.wait_for_status(response.json()["id"], {"finished", "failed", "stopped"})
    assert view["status"] == expect, view
    return view


def test_a_successful_job_leaves_its_process_changes_behind_it(web, workers, tmp_path):
    workers(count=1)
    first = run(web, "inspect", {})["result"]
    tampered = run(web, "tamper", {"directory": str(tmp_path)})["result"]
    after = run(web, "inspect", {})["result"]
    assert first["pid"] == tampered["pid"] == after["pid"], "a job that succeeded keeps its horse"
    assert after["cwd"] == first["cwd"] == str(ROOT)
    assert after["tampered"] is None
    assert after["umask"] == first["umask"]
    assert not after["sigusr1_ignored"]


def test_a_failed_job_gets_the_next_job_a_fresh_process(web, workers, tmp_path):
    workers(count=1)
    before = run(web, "inspect", {})["result"]
    failed = run(web, "tamper", {"directory": str(tmp_path), "fail": True}, expect="failed")
    assert failed["error"] == {"type": "RuntimeError", "message": "tampered, then failed"}
    after = run(web, "inspect", {})["result"]
    assert after["pid"] != before["pid"]
    assert after["cwd"] == str(ROOT) and after["tampered"] is None


def test_a_timed_out_jobs_horse_is_replaced(web, workers):
    workers(count=1)
    before = run(web, "inspect", {})["result"]
    timed_out = run(web, "sleep", {"seconds": 30, "timeout": 1}, expect="failed")
    assert timed_out["error"]["type"] == "JobTimeout"
    assert run(web, "inspect", {})["result"]["pid"] != before["pid"]


def test_a_job_that_ignores_its_timeout_is_killed_and_its_horse_replaced(web, workers):
    workers(count=1)
    before = run(web, "inspect", {})["result"]
    assert (
        run(web, "stubborn", {"seconds": 60, "timeout": 1}, expect="failed")["error"]["type"] == "JobTimeout"
    )
    assert run(web, "inspect", {})["result"]["pid"] != before["pid"]


def test_a_horse_past_its_memory_cap_is_replaced(web, workers):
    workers(count=1, HORSE_MAX_RSS_MB="200")
    before = run(web, "inspect", {})["result"]
    assert run(web, "inspect", {})["result"]["pid"] == before["pid"], "under the cap the horse stays"
    hogged = run(web, "hog", {"megabytes": 300})["result"]
    assert hogged["pid"] == before["pid"]
    assert run(web, "inspect", {})["result"]["pid"] != before["pid"]


def test_a_horse_is_replaced_after_horse_max_jobs(web, workers):
    workers(count=1, HORSE_MAX_JOBS="2")
    pids = [run(web, "inspect", {})["result"]["pid"] for _ in range(4)]
    assert pids[0] == pids[1] != pids[2] == pids[3]


def test_processes_a_job_starts_get_default_signal_handling(web, workers):
    workers(count=1)
    seen = run(web, "inspect", {})["result"]
    assert signal.SIGTERM not in seen["child_ignores"]
    assert signal.SIGINT not in seen["child_ignores"]


# ---------------------------------------------------------------- only registered functions run


def ended(real_redis, job_id: str) -> tuple[str, dict]:
    """The end state and error of a job no API key owns (so read from Redis, not the API)."""
    key = f"rq:job:{job_id}"
    status = wait_until(
        lambda: (
            (real_redis.hget(key, "status") or b"").decode() in ("finished", "failed")
            and real_redis.hget(key, "status").decode()
        ),
        what=f"job {job_id} to end",
    )
    return status, json.loads(real_redis.hget(key, "meta") or b"{}").get("error")


def stored_job(real_redis, func: str, **options: object):
    """A job written straight into Redis, as someone with access to it could."""
    queue = RQQueue("default", connection=real_redis, serializer=JSONSerializer)
    return queue.enqueue(func, message="from outside", **options)


@pytest.mark.parametrize("when", ["on_success", "on_failure", "on_stopped"])
def test_a_job_naming_an_unregistered_callback_runs_nothing(workers, real_redis, proc_dir, when):
    job = stored_job(real_redis, "jobs.types.log.write_log", **{when: Callback("tests.fixtures.mark")})
    workers(count=1)
    status, error = ended(real_redis, job.id)
    assert status == "failed"
    assert error["type"] == "UnregisteredJob"
    assert "tests.fixtures.mark" in error["message"]
    assert not (proc_dir / "jobs.log").exists(), "the job's own function must not run either"
    assert real_redis.get("afterward-test:marked") is None


def test_an_unregistered_function_with_a_failure_callback_runs_neither(workers, real_redis):
    job = stored_job(real_redis, "tests.fixtures.mark", on_failure=Callback("tests.fixtures.mark"))
    workers(count=1)
    assert ended(real_redis, job.id) == ("failed", {"type": "UnregisteredJob", "message": ANY})
    assert real_redis.get("afterward-test:marked") is None


def test_a_dependent_job_goes_through_the_same_check(workers, real_redis, proc_dir):
    first = stored_job(real_redis, "jobs.types.log.write_log")
    queue = RQQueue("default", connection=real_redis, serializer=JSONSerializer)
    dependent = queue.enqueue("tests.fixtures.mark", depends_on=first)
    workers(count=1)
    assert ended(real_redis, first.id)[0] == "finished"
    assert ended(real_redis, dependent.id) == ("failed", {"type": "UnregisteredJob", "message": ANY})
    assert real_redis.get("afterward-test:marked") is None
