"""End to end: the Procfile's gunicorn web process and `rq worker-pool`, on a real Redis."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from rq import Queue
from rq.serializers import JSONSerializer

from service.workers import live_workers
from tests.support import DEADLINE, WebService, wait_until

pytestmark = pytest.mark.integration

TERMINAL = {"finished", "failed", "canceled", "stopped"}


def wait_for_workers(real_redis, count: int, timeout: float = 30) -> list[str]:
    return wait_until(
        lambda: len(live_workers(real_redis)) >= count and live_workers(real_redis),
        timeout=timeout,
        what=f"{count} live workers",
    )


def log_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def submit(web: WebService, type_name: str, body: dict, expect: int = 202) -> dict:
    response = web.post_job(type_name, body)
    assert response.status_code == expect, response.text
    return response.json()


# ---------------------------------------------------------------- log jobs


def test_log_job_runs_and_writes_exactly_one_line(web, workers, real_redis, proc_dir):
    pool = workers(count=2)
    message = 'line one\nline two\r\n{"forged": true}\x00\x1b[31m é ✓ 🎉 \u2028 end'
    view = submit(web, "log", {"message": message, "level": "error"})
    done = web.wait_for_status(view["id"], {"finished"})
    assert done["result"]["level"] == "error"
    assert done["attempts"] == 1
    assert done["started_at"] >= done["created_at"] and done["ended_at"] >= done["started_at"]

    records = log_records(proc_dir / "jobs.log")
    assert len(records) == 1, "one job, one line"
    assert records[0]["message"] == message  # Unicode and control characters round-trip
    assert records[0]["job_id"] == view["id"]
    assert records[0]["level"] == "error"
    assert records[0]["time"].endswith("Z")
    # The worker's own stdout carries the same line.
    wait_until(lambda: view["id"] in pool.output(), what="the line in the worker log")
    assert real_redis.ttl(f"rq:job:{view['id']}") > 23 * 3600


def test_many_concurrent_log_jobs_give_one_line_each(web, workers, proc_dir):
    workers(count=2)
    ids = [submit(web, "log", {"message": f"message {i} " + "x" * 5000})["id"] for i in range(40)]
    for job_id in ids:
        web.wait_for_status(job_id, {"finished"})
    records = log_records(proc_dir / "jobs.log")
    assert sorted(r["job_id"] for r in records) == sorted(ids)


# ---------------------------------------------------------------- sleep jobs, progress, long polls


def test_sleep_reports_progress_while_running(web, workers):
    workers(count=1)
    view = submit(web, "sleep", {"seconds": 3})
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = web.job(view["id"])
        if current["progress"] is not None:
            seen.append(current["progress"]["percent"])
        if current["status"] == "finished":
            break
        time.sleep(0.2)
    assert current["status"] == "finished"
    assert current["result"] == {"slept": 3.0}
    assert current["progress"]["percent"] == 100
    running = [p for p in seen if p < 100]
    assert len(set(running)) >= 3, f"progress did not move while running: {seen}"
    assert running == sorted(running)


def test_long_poll_is_woken_by_the_job_end_event(web, workers):
    # The session's web process re-reads a waiting job only once a minute (LONG_POLL_RECHECK):
    # an answer well within the 30 s wait can only have come from the job's end event.
    workers(count=1)
    view = submit(web, "sleep", {"seconds": 1})
    started = time.monotonic()
    done = web.job(view["id"], wait=30)
    assert done["status"] == "finished"
    assert time.monotonic() - started < 20, "the answer came at the end of the wait, not the job"


def test_long_poll_answers_after_n_seconds_with_the_current_state(web, workers):
    workers(count=1)
    view = submit(web, "sleep", {"seconds": 30})
    web.wait_for_status(view["id"], {"started"})
    started = time.monotonic()
    current = web.job(view["id"], wait=1)
    assert current["status"] == "started"
    assert time.monotonic() - started >= 1


def test_waiting_clients_cannot_take_every_thread(env, proc_dir, workers):
    # One web process with 4 threads, of which at most 2 may wait.
    web = WebService(dict(env, WEB_CONCURRENCY="1", WEB_THREADS="4", LONG_POLL_SLOTS="2"), proc_dir)
    try:
        workers(count=1)
        view = submit(web, "sleep", {"seconds": 120})
        web.wait_for_status(view["id"], {"started"})
        answers: list[dict] = []

        def long_poll() -> None:
            answers.append(requests.get(web.url(f"/jobs/{view['id']}?wait=60"), timeout=90).json())

        pollers = [threading.Thread(target=long_poll) for _ in range(6)]
        for thread in pollers:
            thread.start()
        # Four of six are told the current state at once (well before their 60 s wait ends);
        # two hold their slot.
        wait_until(lambda: len(answers) >= 4, timeout=20, what="the over-quota polls to answer")
        assert all(answer["status"] == "started" for answer in answers)
        # Meanwhile other requests are served: the service is not starved.
        assert requests.get(web.url("/healthz"), timeout=10).status_code == 200
        posted = requests.post(web.url("/jobs/log"), json={"message": "still served"}, timeout=10)
        assert posted.status_code == 202
        assert len(answers) == 4, "the two slot holders are still waiting"
        requests.delete(web.url(f"/jobs/{view['id']}"), timeout=30)
        for thread in pollers:
            thread.join(DEADLINE)
        assert len(answers) == 6
        assert sorted(a["status"] for a in answers)[-2:] == ["stopped", "stopped"]
    finally:
        web.stop()


# ---------------------------------------------------------------- cancel


def test_cancel_queued_job_never_runs(web, workers, proc_dir):
    workers(count=1)
    blocker = submit(web, "sleep", {"seconds": 30})
    web.wait_for_status(blocker["id"], {"started"})
    waiting = submit(web, "log", {"message": "must not run"})
    response = web.http.delete(web.url(f"/jobs/{waiting['id']}"))
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    web.http.delete(web.url(f"/jobs/{blocker['id']}"))
    after = submit(web, "log", {"message": "runs"})
    web.wait_for_status(after["id"], {"finished"})
    assert [r["message"] for r in log_records(proc_dir / "jobs.log")] == ["runs"]
    assert web.job(waiting["id"])["status"] == "canceled"


def test_cancel_scheduled_job(web, workers, proc_dir):
    workers(count=1)
    later = submit(web, "log", {"message": "must not run", "delay": 2})
    assert later["status"] == "scheduled"
    assert web.http.delete(web.url(f"/jobs/{later['id']}")).json()["status"] == "canceled"
    # A job due just after the canceled one runs: by then the scheduler has passed its time.
    witness = submit(web, "log", {"message": "runs", "delay": 2})
    web.wait_for_status(witness["id"], {"finished"})
    assert web.job(later["id"])["status"] == "canceled"
    assert [r["message"] for r in log_records(proc_dir / "jobs.log")] == ["runs"]


def test_cancel_running_job_stops_it_and_the_worker_goes_on(web, workers):
    workers(count=1)
    view = submit(web, "sleep", {"seconds": 60})
    web.wait_for_status(view["id"], {"started"})
    response = web.http.delete(web.url(f"/jobs/{view['id']}"))
    assert response.status_code in (200, 202)
    stopped = web.wait_for_status(view["id"], {"stopped"})
    assert stopped["error"]["type"] == "JobStopped"
    assert stopped["ended_at"] is not None
    # The same (only) worker takes the next job.
    nxt = submit(web, "log", {"message": "next"})
    assert web.wait_for_status(nxt["id"], {"finished"})["status"] == "finished"
    # Finished jobs cannot be canceled.
    conflict = web.http.delete(web.url(f"/jobs/{nxt['id']}"))
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "conflict"


# ---------------------------------------------------------------- timeouts, crashes, retries


def test_timeout_fails_the_job_in_plain_words(web, workers):
    workers(count=1)
    view = submit(web, "sleep", {"seconds": 30, "timeout": 1})
    failed = web.wait_for_status(view["id"], {"failed"})
    assert failed["error"]["type"] == "JobTimeout"
    assert "1 s timeout" in failed["error"]["message"]
    assert "Traceback" not in json.dumps(failed)


def test_a_job_that_swallows_its_timeout_is_killed(web, workers):
    workers(count=1)
    view = submit(web, "stubborn", {"seconds": 120, "timeout": 1})
    failed = web.wait_for_status(view["id"], {"failed"})
    assert failed["error"]["type"] == "JobTimeout"
    nxt = submit(web, "log", {"message": "after"})
    web.wait_for_status(nxt["id"], {"finished"})


def test_a_crashing_job_fails_and_the_worker_survives(web, workers):
    workers(count=1)
    view = submit(web, "crash", {})
    failed = web.wait_for_status(view["id"], {"failed"})
    assert failed["error"]["type"] == "WorkerDied"
    assert "Traceback" not in failed["error"]["message"]
    nxt = submit(web, "log", {"message": "after the crash"})
    web.wait_for_status(nxt["id"], {"finished"})


def test_failed_attempt_is_retried_then_finishes(web, workers):
    workers(count=1)
    view = submit(web, "flaky", {"failures": 1, "retries": 3})
    done = web.wait_for_status(view["id"], {"finished"})
    assert done["attempts"] == 2
    assert done["retries_left"] == 2
    assert done["result"] == {"attempt": 2}
    assert done["error"] is None


def test_retries_exhausted_leave_the_last_error(web, workers):
    workers(count=1)
    view = submit(web, "flaky", {"failures": 5, "retries": 1})
    failed = web.wait_for_status(view["id"], {"failed"})
    assert failed["attempts"] == 2
    assert failed["retries_left"] == 0
    assert failed["error"] == {"type": "RuntimeError", "message": "planned failure on attempt 2"}


def test_manual_retry_reruns_a_failed_job(web, workers):
    workers(count=1)
    view = submit(web, "flaky", {"failures": 1})
    web.wait_for_status(view["id"], {"failed"})
    response = web.http.post(web.url(f"/jobs/{view['id']}/retry"))
    assert response.status_code == 202
    assert response.headers["Location"] == f"/jobs/{view['id']}"
    done = web.wait_for_status(view["id"], {"finished"})
    assert done["attempts"] == 2
    assert web.http.post(web.url(f"/jobs/{view['id']}/retry")).status_code == 409


# ---------------------------------------------------------------- scheduling and priorities


def test_delayed_job_is_scheduled_then_runs(web, workers):
    workers(count=1)
    view = submit(web, "log", {"message": "later", "delay": 2})
    assert web.job(view["id"])["status"] == "scheduled"
    done = web.wait_for_status(view["id"], {"finished"})
    created = time.mktime(time.strptime(done["created_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    started = time.mktime(time.strptime(done["started_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert started - created >= 1


def test_high_jobs_run_before_default_ones(web, workers, proc_dir):
    ids = [submit(web, "log", {"message": f"default {i}"})["id"] for i in range(3)]
    ids += [submit(web, "log", {"message": f"high {i}", "queue": "high"})["id"] for i in range(3)]
    ids += [submit(web, "log", {"message": f"low {i}", "queue": "low"})["id"] for i in range(2)]
    workers(count=1)
    for job_id in ids:
        web.wait_for_status(job_id, {"finished"})
    order = [r["message"].split()[0] for r in log_records(proc_dir / "jobs.log")]
    assert order == ["high"] * 3 + ["default"] * 3 + ["low"] * 2


# ---------------------------------------------------------------- idempotency, ids, bad input over HTTP


def test_idempotent_post_runs_the_job_once(web, workers, proc_dir):
    workers(count=1)
    headers = {"Idempotency-Key": "payment-7"}
    first = web.post_job("log", {"message": "charge"}, headers=headers)
    second = web.post_job("log", {"message": "charge"}, headers=headers)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    web.wait_for_status(first.json()["id"], {"finished"})
    third = web.post_job("log", {"message": "charge"}, headers=headers)
    assert third.status_code == 200 and third.json()["status"] == "finished"
    rejected = web.post_job("log", {"message": "refund"}, headers=headers)
    assert rejected.status_code == 422
    assert len(log_records(proc_dir / "jobs.log")) == 1


@pytest.mark.parametrize("path", ["/jobs/" + "0" * 32, "/jobs/" + "z" * 3000, "/jobs/..%2F..%2Fetc%2Fpasswd"])
def test_unknown_ids_are_404_over_http(web, path):
    response = requests.get(web.url(path), timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_oversized_bodies_are_413_with_and_without_content_length(web, real_redis):
    big = json.dumps({"message": "x" * (1024 * 1024 + 10)}).encode()
    response = requests.post(
        web.url("/jobs/log"), data=big, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"

    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    response = requests.post(
        web.url("/jobs/log"), data=chunks(), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert real_redis.llen("rq:queue:default") == 0


def test_malformed_json_over_http_is_400(web):
    response = requests.post(
        web.url("/jobs/log"), data=b'{"message": ', headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


# ---------------------------------------------------------------- workers and readiness


def test_readyz_follows_the_workers(web, workers, real_redis):
    # Workers are another process type: their absence is reported, never a reason to take the
    # web process out of its load balancer's rotation.
    def ready() -> dict:
        response = requests.get(web.url("/readyz"), timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    alone = ready()
    assert (alone["checks"]["workers"], alone["checks"]["embedders"]) == (0, 0)
    assert any("No worker process is alive" in warning for warning in alone["warnings"])
    pool = workers(count=1)
    wait_for_workers(real_redis, 1)
    served = ready()
    assert (served["checks"]["workers"], served["checks"]["embedders"]) == (1, 0)
    assert not any("No worker process" in warning for warning in served["warnings"])
    assert served["checks"]["redis"] == "ok" and served["checks"]["search"] == "off"
    pool.stop()
    # A clean stop says so at once; a killed worker stops counting once its heartbeat is stale.
    wait_until(lambda: ready()["checks"]["workers"] == 0, timeout=75, what="readyz")


def test_a_dead_worker_process_is_replaced(web, workers, real_redis):
    pool = workers(count=2)
    names = set(wait_for_workers(real_redis, 2))
    victim = int(real_redis.hget(sorted(names)[0], "pid"))
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: set(live_workers(real_redis)) - names, timeout=30, what="a replacement worker", process=pool
    )
    view = submit(web, "log", {"message": "after replacement"})
    web.wait_for_status(view["id"], {"finished"})
    assert pool.alive()


def test_a_job_naming_an_unregistered_function_runs_nothing(workers, real_redis, proc_dir, env):
    marker = proc_dir / "pwned"
    queue = Queue("default", connection=real_redis, serializer=JSONSerializer)
    job = queue.enqueue("os.system", f"touch {marker}")
    workers(count=1)
    wait_until(lambda: real_redis.hget(job.key, "status") == b"failed", what="the job to fail")
    assert not marker.exists()
    meta = json.loads(real_redis.hget(job.key, "meta"))
    assert meta["error"]["type"] == "UnregisteredJob"


def test_web_answers_503_while_redis_is_unreachable(session_env, proc_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    web = WebService(dict(session_env, REDIS_URL=f"redis://127.0.0.1:{port}/0"), proc_dir)
    try:
        response = requests.post(web.url("/jobs/log"), json={"message": "x"}, timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "redis_unavailable"
        assert response.headers["Retry-After"]
        assert requests.get(web.url("/readyz"), timeout=30).status_code == 503
        assert requests.get(web.url("/healthz"), timeout=30).status_code == 200
    finally:
        web.stop()


def test_a_job_taken_by_a_worker_that_died_is_run_by_another(web, workers, real_redis):
    # A worker that dies between taking a job and starting it leaves the id on the
    # intermediate list; this is that state, made directly.
    view = submit(web, "log", {"message": "orphan"})
    real_redis.lmove("rq:queue:default", "rq:queue:default:intermediate")
    workers(count=1, INTERMEDIATE_GRACE="1", MAINTENANCE_INTERVAL="1")
    done = web.wait_for_status(view["id"], {"finished"})
    assert done["attempts"] == 1


def test_killing_idle_workers_loses_no_job(web, workers, real_redis):
    # An idle worker killed while it waits must not take a job with it (stock RQ's BLPOP
    # hands the next job to a dead connection when a forked child keeps its socket open).
    pool = workers(count=2)
    killed: set[str] = set()
    for round_ in range(3):
        alive = wait_until(
            lambda: (
                set(live_workers(real_redis)) - killed
                if len(set(live_workers(real_redis)) - killed) >= 2
                else None
            ),
            timeout=30,
            what="two live workers",
            process=pool,
        )
        victim = sorted(alive)[0]
        os.kill(int(real_redis.hget(victim, "pid")), signal.SIGKILL)
        killed.add(victim)
        ids = [submit(web, "log", {"message": f"round {round_} job {i}"})["id"] for i in range(10)]
        for job_id in ids:
            web.wait_for_status(job_id, {"finished"})


def test_a_stopped_job_can_be_retried(web, workers):
    workers(count=1)
    view = submit(web, "sleep", {"seconds": 2})
    web.wait_for_status(view["id"], {"started"})
    web.http.delete(web.url(f"/jobs/{view['id']}"))
    web.wait_for_status(view["id"], {"stopped"})
    assert web.http.post(web.url(f"/jobs/{view['id']}/retry")).status_code == 202
    done = web.wait_for_status(view["id"], {"finished"})
    assert done["attempts"] == 2
    assert done["error"] is None
    assert done["progress"]["percent"] == 100


def _pickled(value: bytes) -> bool:
    """True for a pickle (protocol 2 or newer), also inside zlib, as RQ stores job data."""
    for candidate in (value, _inflate(value)):
        if candidate and candidate[:1] == b"\x80" and candidate[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            return True
    return False


def _inflate(value: bytes) -> bytes:
    import zlib

    try:
        return zlib.decompress(value)
    except zlib.error:
        return b""


def test_no_pickle_anywhere_in_redis(web, workers, real_redis):
    workers(count=1)
    done = submit(web, "log", {"message": "plain"})
    failed = submit(web, "flaky", {"failures": 5})
    web.wait_for_status(done["id"], {"finished"})
    web.wait_for_status(failed["id"], {"failed"})
    # Requeued from the dashboard (an operator's action), then retried through the API.
    assert requests.post(web.url(f"/rq/job/{failed['id']}/requeue"), timeout=10).status_code == 200
    web.wait_for_status(failed["id"], {"failed"})
    assert web.http.post(web.url(f"/jobs/{failed['id']}/retry")).status_code == 202
    web.wait_for_status(failed["id"], {"failed"})

    values = 0
    for key in real_redis.scan_iter(count=1000):
        kind = real_redis.type(key)
        if kind == b"string":
            stored = [real_redis.get(key)]
        elif kind == b"hash":
            stored = list(real_redis.hgetall(key).values())
        elif kind == b"stream":
            stored = [v for _, fields in real_redis.xrange(key) for v in fields.values()]
        else:
            continue
        for value in stored:
            values += 1
            assert not _pickled(value), f"pickled data in {key!r}"
    assert values > 20


def test_api_keys_ownership_and_rate_limits_over_http(session_env, proc_dir, workers):
    env = dict(session_env, API_KEYS="alpha-key, beta-key", RATE_LIMIT="5 per minute", SEARCH_WARMUP="0")
    keyed = WebService(env, proc_dir)
    try:
        alpha, beta = {"Authorization": "Bearer alpha-key"}, {"Authorization": "Bearer beta-key"}
        assert requests.post(keyed.url("/jobs/log"), json={"message": "x"}, timeout=10).status_code == 401
        job = requests.post(keyed.url("/jobs/log"), json={"message": "x"}, headers=alpha, timeout=10).json()
        assert requests.get(keyed.url(f"/jobs/{job['id']}"), headers=beta, timeout=10).status_code == 404
        statuses = [requests.get(keyed.url("/jobs"), headers=alpha, timeout=10).status_code for _ in range(5)]
        assert statuses[-1] == 429 and statuses[0] == 200
        limited = requests.get(keyed.url(f"/jobs/{job['id']}"), headers=alpha, timeout=10)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
        assert requests.get(keyed.url("/healthz"), timeout=10).status_code == 200
    finally:
        keyed.stop()
