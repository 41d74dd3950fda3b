"""Job dependencies end to end: `depends_on` and `allow_failure` on the web process and real workers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.support import WebService
from tests.test_security import KEY_A, KEY_B

pytestmark = pytest.mark.integration

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def submit(
    web: WebService, type_name: str, body: dict, expect: int = 202, headers: dict | None = None
) -> dict:
    response = requests.post(web.url(f"/jobs/{type_name}"), json=body, headers=headers, timeout=30)
    assert response.status_code == expect, response.text
    return response.json()


def log_job(web: WebService, *depends_on: str, **options: object) -> dict:
    body = {"message": "dependency test", **options}
    if depends_on:
        body["depends_on"] = list(depends_on)
    return submit(web, "log", body)


def assert_dependency_failed(view: dict, dependency: str, how: str) -> None:
    assert view["status"] == "canceled", view
    assert view["error"]["type"] == "DependencyFailed"
    assert dependency in view["error"]["message"] and how in view["error"]["message"]
    assert view["started_at"] is None and view["ended_at"] is not None


def test_a_dependent_waits_deferred_and_runs_after_its_dependency(web, workers):
    first = submit(web, "sleep", {"seconds": 1})
    second = log_job(web, first["id"])
    assert second["status"] == "deferred"
    assert second["depends_on"] == [first["id"]] and second["allow_failure"] is False
    assert "depends_on" not in first
    workers(count=2)
    first = web.wait_for_status(first["id"], {"finished"})
    second = web.wait_for_status(second["id"], {"finished"})
    assert second["started_at"] >= first["ended_at"]


def test_failures_cancel_dependents_transitively_and_allow_failure_runs_anyway(web, workers):
    failing = submit(web, "flaky", {"failures": 1})  # no retries: its one failure is its end
    child = log_job(web, failing["id"])
    grandchild = log_job(web, child["id"])
    tolerant = log_job(web, failing["id"], allow_failure=True)
    retried = submit(web, "flaky", {"failures": 1, "retries": 1})  # a failed attempt retried: no end
    after_retry = log_job(web, retried["id"])
    workers(count=2)
    web.wait_for_status(failing["id"], {"failed"})
    assert_dependency_failed(web.wait_for_status(child["id"], {"canceled"}), failing["id"], "failed")
    assert_dependency_failed(web.wait_for_status(grandchild["id"], {"canceled"}), child["id"], "canceled")
    assert web.wait_for_status(tolerant["id"], {"finished", "canceled"})["status"] == "finished"
    assert web.wait_for_status(retried["id"], {"finished"})["attempts"] == 2
    assert web.wait_for_status(after_retry["id"], {"finished", "canceled"})["status"] == "finished"


def test_a_stopped_dependency_cancels_its_dependents(web, workers, real_redis):
    workers(count=1)
    running = submit(web, "hold", {"seconds": 60})
    web.wait_for_status(running["id"], {"started"})
    dependent = log_job(web, running["id"])
    assert web.http.delete(web.url(f"/jobs/{running['id']}"), timeout=30).json()["status"] == "stopped"
    assert_dependency_failed(web.wait_for_status(dependent["id"], {"canceled"}), running["id"], "stopped")


def test_dependencies_that_ended_before_the_submit_settle_it_at_once(web, workers):
    workers(count=1)
    done = web.wait_for_status(log_job(web)["id"], {"finished"})
    failed = web.wait_for_status(submit(web, "flaky", {"failures": 1})["id"], {"failed"})
    assert web.wait_for_status(log_job(web, done["id"])["id"], {"finished"})["status"] == "finished"
    canceled = log_job(web, done["id"], failed["id"])
    assert_dependency_failed(canceled, failed["id"], "failed")  # in the submit's own answer
    tolerant = log_job(web, failed["id"], allow_failure=True)
    assert tolerant["status"] in ("queued", "started", "finished")
    assert web.wait_for_status(tolerant["id"], {"finished"})["status"] == "finished"


def test_canceling_a_dependency_or_a_deferred_job_cancels_what_waits_on_it(web):
    queued = log_job(web)  # no worker: it stays queued
    deferred = log_job(web, queued["id"])
    behind_deferred = log_job(web, deferred["id"])
    behind_queued = log_job(web, queued["id"])
    canceled = web.http.delete(web.url(f"/jobs/{deferred['id']}"), timeout=30)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert_dependency_failed(web.job(behind_deferred["id"]), deferred["id"], "canceled")
    assert web.job(behind_queued["id"])["status"] == "deferred"
    assert web.http.delete(web.url(f"/jobs/{queued['id']}"), timeout=30).json()["status"] == "canceled"
    assert_dependency_failed(web.job(behind_queued["id"]), queued["id"], "canceled")


def test_a_chain_of_100_and_a_fan_in_of_100_finish(web, workers):
    chain = [log_job(web)["id"]]
    for _ in range(99):
        chain.append(log_job(web, chain[-1])["id"])
    fanned = [log_job(web)["id"] for _ in range(100)]
    gathered = log_job(web, *fanned)
    assert gathered["status"] == "deferred" and len(gathered["depends_on"]) == 100
    workers(count=2)
    last = web.wait_for_status(chain[-1], {"finished", "canceled"})
    assert last["status"] == "finished"
    before_last = web.job(chain[-2])
    assert last["started_at"] >= before_last["ended_at"]
    gathered = web.wait_for_status(gathered["id"], {"finished", "canceled"})
    assert gathered["status"] == "finished"
    assert gathered["started_at"] >= max(web.job(job_id)["ended_at"] for job_id in fanned)


@pytest.fixture
def keyed_web(env, proc_dir) -> Iterator[WebService]:
    web = WebService(dict(env, API_KEYS=f"{KEY_A},{KEY_B}", RATE_LIMIT="off"), proc_dir)
    yield web
    web.stop()


def test_unknown_foreign_malformed_and_too_many_ids_are_refused(keyed_web):
    web = keyed_web
    mine = submit(web, "log", {"message": "mine"}, headers=A)["id"]
    theirs = submit(web, "log", {"message": "theirs"}, headers=B)["id"]
    unknown = "0" * 32

    def refused(ids: list[str], **options: object) -> dict:
        body = {"message": "x", "depends_on": ids, **options}
        return submit(web, "log", body, expect=422, headers=A)["error"]

    foreign, missing = refused([mine, theirs]), refused([mine, unknown])
    assert foreign["code"] == missing["code"] == "unknown_dependency"
    # The same answer for a job of another key and one that does not exist, but the id.
    assert foreign["message"].replace(theirs, "ID") == missing["message"].replace(unknown, "ID")
    assert refused(["not-a-job-id"])["code"] == "unknown_dependency"
    assert refused([mine] * 101)["code"] == "validation_failed"
    assert refused([], allow_failure=True)["code"] == "validation_failed"
    assert refused([mine], delay=5)["code"] == "validation_failed"
    repeated = submit(web, "log", {"message": "x", "depends_on": [mine, mine]}, headers=A)
    assert repeated["depends_on"] == [mine]  # a repeated id counts once
