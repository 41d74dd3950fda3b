"""Batches on the real stack: all or none, one `batch.ended` callback however the jobs end.

(tests/test_batches.py is about something else: an embedder taking several jobs together.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from jobs import keys
from tests.support import ROOT, WebService, wait_until
from tests.test_security import KEY_A, KEY_B
from tests.test_webhooks import receiver, verify  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def post_batch(web: WebService, jobs: list[dict], callback_url: str | None = None, **kwargs) -> dict:
    body = {"jobs": jobs} if callback_url is None else {"jobs": jobs, "callback_url": callback_url}
    answer = web.http.post(web.url("/batches"), json=body, timeout=60, **kwargs)
    assert answer.status_code == 202, answer.text
    assert answer.headers["Location"] == f"/batches/{answer.json()['id']}"
    return answer.json()


def read_batch(web: WebService, batch_id: str, wait: float = 0, **kwargs) -> dict:
    params = {"wait": wait} if wait else None
    answer = web.http.get(web.url(f"/batches/{batch_id}"), params=params, timeout=wait + 30, **kwargs)
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_done(web: WebService, batch_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = read_batch(web, batch_id, wait=10)
        if view["done"] or time.monotonic() > deadline:
            return view


def batch_deliveries(hook) -> list[dict]:
    return [d for d in hook.received if d["headers"].get("Afterward-Event") == "batch.ended"]


def test_a_thousand_jobs_end_with_one_signed_callback(web, workers, receiver, real_redis):  # noqa: F811
    hook, url = receiver
    workers(count=2)
    jobs = [{"type": "log", "message": f"line {i}"} for i in range(1000)]
    accepted = post_batch(web, jobs, callback_url=f"{url}/batches")
    batch_id, job_ids = accepted["id"], accepted["job_ids"]
    assert accepted["total"] == 1000 and len(set(job_ids)) == 1000
    # A job of the batch says which batch it is in.
    assert web.job(job_ids[0])["batch_id"] == batch_id

    view = wait_done(web, batch_id)
    assert view["done"] and view["ended_at"] is not None
    assert view["counts"]["finished"] == 1000 and view["total"] == 1000
    assert view["job_ids"] == job_ids  # in the order they were sent
    wait_until(lambda: read_batch(web, batch_id)["callback"]["status"] == "delivered", what="the delivery")
    time.sleep(1)  # room for a second delivery, were there one
    (delivery,) = batch_deliveries(hook)
    verify(delivery)
    assert delivery["path"] == "/batches"
    assert delivery["headers"]["Afterward-Delivery"] == f"{batch_id}.ended"
    body = json.loads(delivery["body"])
    assert body["id"] == batch_id and body["done"] and body["counts"]["finished"] == 1000
    assert "owner" not in body and body["job_ids"] == job_ids
    # Ended batches are kept as long as results: RESULT_TTL.
    assert 0 < real_redis.ttl(keys.batch(batch_id)) <= 24 * 3600
    assert real_redis.zscore(keys.BATCHES_OPEN, batch_id) is None


def test_a_worker_killed_mid_batch_still_ends_it_once(web, workers, receiver, real_redis):  # noqa: F811
    hook, url = receiver
    # Quick recovery: maintenance every 2 s; an abandoned job is seen after its 8 s heartbeat.
    pool = workers(count=2, MAINTENANCE_INTERVAL="2", INTERMEDIATE_GRACE="2")
    jobs = [{"type": "sleep", "seconds": 0.2} for _ in range(40)]
    batch_id = post_batch(web, jobs, callback_url=url)["id"]
    wait_until(lambda: read_batch(web, batch_id)["counts"]["finished"] >= 4, what="a few jobs to finish")
    # The pool's children are its workers, each running a job of the batch (and its horse
    # dies with it): the job it ran is abandoned, and failed by maintenance elsewhere.
    worker = psutil.Process(pool.pid).children()[0]
    worker.send_signal(signal.SIGKILL)
    view = wait_done(web, batch_id, timeout=90)
    assert view["done"], view
    assert view["counts"]["failed"] >= 1, view["counts"]
    assert view["counts"]["finished"] + view["counts"]["failed"] == 40
    wait_until(lambda: read_batch(web, batch_id)["callback"]["status"] == "delivered", what="the delivery")
    time.sleep(1)
    (delivery,) = batch_deliveries(hook)
    verify(delivery)
    assert json.loads(delivery["body"])["counts"] == view["counts"]


def test_bad_jobs_are_named_by_index_and_nothing_is_written(web, real_redis):
    before = real_redis.dbsize()
    answer = web.http.post(
        web.url("/batches"),
        json={"jobs": [{"type": "log", "message": "fine"}, {"type": "log"}, {"type": "nope"}, "x"]},
        timeout=30,
    )
    assert answer.status_code == 422
    fields = [detail["field"] for detail in answer.json()["error"]["details"]]
    assert fields == ["jobs[1].message", "jobs[2].type", "jobs[3]"]
    for jobs in ([], [{"type": "log", "message": "x"}] * 1001):
        answer = web.http.post(web.url("/batches"), json={"jobs": jobs}, timeout=30)
        assert answer.status_code == 422 and answer.json()["error"]["details"][0]["field"] == "jobs"
    assert real_redis.dbsize() == before


@pytest.fixture
def keyed_web(env, proc_dir) -> Iterator[WebService]:
    web = WebService(dict(env, API_KEYS=f"{KEY_A},{KEY_B}", KEY_MAX_WAITING="5"), proc_dir)
    yield web
    web.stop()


def test_a_batch_the_quota_refuses_takes_no_place_and_writes_nothing(keyed_web, real_redis):
    web = keyed_web
    first = post_batch(web, [{"type": "log", "message": f"{i}"} for i in range(3)], headers=A)
    written = set(real_redis.keys("*"))
    answer = web.http.post(
        web.url("/batches"), json={"jobs": [{"type": "log", "message": "x"}] * 3}, headers=A, timeout=30
    )
    assert answer.status_code == 429 and answer.json()["error"]["code"] == "quota_exceeded"
    # Nothing written (the rate limiter's own counter aside), and no place kept: 2 more fit.
    assert {k for k in real_redis.keys("*") if b"rate-limits" not in k} == {
        k for k in written if b"rate-limits" not in k
    }
    post_batch(web, [{"type": "log", "message": "y"}] * 2, headers=A)
    # Another key's share is its own; and it cannot see the first key's batch.
    post_batch(web, [{"type": "log", "message": "z"}], headers=B)
    missing = web.http.get(web.url(f"/batches/{first['id']}"), headers=B, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert read_batch(web, first["id"], headers=A)["counts"]["queued"] == 3


def test_an_idempotency_key_gives_the_same_batch(keyed_web):
    web = keyed_web
    jobs = [{"type": "log", "message": "once"}] * 2
    headers = {**A, "Idempotency-Key": "batch-1"}
    first = web.http.post(web.url("/batches"), json={"jobs": jobs}, headers=headers, timeout=30)
    again = web.http.post(web.url("/batches"), json={"jobs": jobs}, headers=headers, timeout=30)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["job_ids"] == first.json()["job_ids"]
    other = web.http.post(web.url("/batches"), json={"jobs": jobs[:1]}, headers=headers, timeout=30)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_wait_returns_when_the_batch_is_done(web, workers):
    workers(count=1)
    batch_id = post_batch(web, [{"type": "sleep", "seconds": 0.5}, {"type": "flaky", "failures": 5}])["id"]
    view = read_batch(web, batch_id, wait=30)
    assert view["done"] and view["counts"]["finished"] == 1 and view["counts"]["failed"] == 1
    assert view["callback"] is None


def test_batch_jobs_wait_for_their_dependencies_and_see_those_already_ended(web, workers, real_redis):
    """A batch job may depend on earlier jobs: one whose dependency has finished is queued by
    the request itself, not left deferred for a maintenance round to find."""
    done = web.post_job("log", {"message": "first"}).json()["id"]
    failing = web.post_job("flaky", {"failures": 5}).json()["id"]
    workers(count=1)
    web.wait_for_status(done, {"finished"})
    web.wait_for_status(failing, {"failed"})
    batch = post_batch(
        web,
        [
            {"type": "log", "message": "after the first", "depends_on": [done]},
            {"type": "log", "message": "after the failure", "depends_on": [failing]},
        ],
    )
    after_done, after_failure = batch["job_ids"]
    assert real_redis.hget(f"rq:job:{after_done}", "status") != b"deferred"
    assert web.job(after_failure)["error"]["type"] == "DependencyFailed"
    view = read_batch(web, batch["id"], wait=30)
    assert view["done"] and view["counts"]["finished"] == 1 and view["counts"]["canceled"] == 1


def json_documents(text: str) -> list[dict]:
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(text.strip()):
        document, end = decoder.raw_decode(text, at)
        found.append(document)
        at = end + (len(text[end:]) - len(text[end:].lstrip()))
    return found


def cli(*args: str) -> subprocess.CompletedProcess:
    """The command line of this checkout's client/ (the virtualenv may hold an older copy)."""
    from tests.test_cli import run

    return run(*args, env={"PYTHONPATH": str(ROOT / "client")})


def test_the_cli_sends_a_long_file_as_batches_of_1000_and_waits(web, workers, tmp_path):
    workers(count=2)
    lines = [json.dumps({"type": "log", "message": f"line {i}"}) for i in range(1004)]
    lines.insert(500, "")  # blank lines are skipped
    lines.append(json.dumps({"type": "flaky", "failures": 3}))  # fails: no retries
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    answer = cli("batch", str(path), "--wait", "--url", web.base)
    assert answer.returncode == 3, answer.stderr  # a job did not finish
    views = json_documents(answer.stdout)
    assert [view["total"] for view in views] == [1000, 5]
    assert all(view["done"] for view in views)
    assert views[0]["counts"]["finished"] == 1000
    assert views[1]["counts"]["finished"] == 4 and views[1]["counts"]["failed"] == 1
    assert "1 job(s) did not finish" in answer.stderr

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"type": "log", "message": "fine"}) + "\n")
    answer = cli("batch", str(good), "--url", web.base)
    assert answer.returncode == 0, answer.stderr
    (accepted,) = json_documents(answer.stdout)
    assert accepted["total"] == 1 and len(accepted["job_ids"]) == 1


def test_the_cli_names_a_bad_line_and_the_service_a_bad_job(web, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"type": "log", "message": "ok"}\n{"message": "no type"}\n')
    answer = cli("batch", str(path), "--url", web.base)
    assert answer.returncode == 2 and "bad.jsonl:2" in answer.stderr
    path.write_text('{"type": "log", "message": "ok"}\n{"type": "log", "message": 7}\n')
    answer = cli("batch", str(path), "--url", web.base)
    assert answer.returncode == 1 and "jobs[1].message" in answer.stderr
