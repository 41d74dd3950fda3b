"""The HTTP contract on fakeredis: answers, job views, errors, idempotency, listing."""

from __future__ import annotations

import json
import zlib

import pytest
from rq.job import JobStatus

from jobs import keys
from jobs.engine.job import Job
from jobs.times import iso, now

VIEW_FIELDS = {
    "id",
    "type",
    "status",
    "queue",
    "scheduled_for",
    "progress",
    "result",
    "error",
    "attempts",
    "retries_left",
    "created_at",
    "enqueued_at",
    "started_at",
    "ended_at",
    "callback",
}


def post(client, type_name, body, **kwargs):
    return client.post(f"/jobs/{type_name}", json=body, **kwargs)


def assert_error(response, status, code=None):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) <= {"code", "message", "details"}
    assert error["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    if code:
        assert error["code"] == code
    return error


def test_healthz_answers_without_redis(client, fake_redis):
    fake_redis.connection_pool.disconnect()
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_post_log_job_answers_202_with_location_and_view(client, fake_redis):
    response = post(client, "log", {"message": "hello", "level": "warning"})
    assert response.status_code == 202
    view = response.get_json()
    assert set(view) == VIEW_FIELDS
    assert response.headers["Location"] == f"/jobs/{view['id']}"
    assert view["type"] == "log"
    assert view["status"] == "queued"
    assert view["queue"] == "default"
    assert view["attempts"] == 0
    assert view["created_at"].endswith("Z")
    # The job is JSON in Redis, never pickle, and names the registered function.
    raw = fake_redis.hget(f"rq:job:{view['id']}", "data")
    stored = json.loads(zlib.decompress(raw))
    assert stored[0] == "jobs.types.log.write_log"
    assert stored[3] == {"message": "hello", "level": "warning"}
    assert fake_redis.lrange("rq:queue:default", 0, -1) == [view["id"].encode()]


def test_get_returns_the_same_view(client):
    view = post(client, "sleep", {"seconds": 2, "queue": "low"}).get_json()
    again = client.get(f"/jobs/{view['id']}")
    assert again.status_code == 200
    assert again.get_json() == view
    assert view["queue"] == "low"


def test_results_are_kept_a_day_not_rqs_500_seconds(client, fake_redis):
    view = post(client, "log", {"message": "x"}).get_json()
    job = Job.fetch(view["id"], connection=fake_redis)
    assert job.result_ttl >= 24 * 3600
    assert job.failure_ttl >= 24 * 3600


def test_default_timeout_fits_the_sleep(client, fake_redis):
    view = post(client, "sleep", {"seconds": 3600}).get_json()
    assert Job.fetch(view["id"], connection=fake_redis).timeout > 3600
    view = post(client, "sleep", {"seconds": 1, "timeout": 7}).get_json()
    assert Job.fetch(view["id"], connection=fake_redis).timeout == 7


def test_delay_makes_the_job_scheduled(client, fake_redis):
    view = post(client, "log", {"message": "later", "delay": 30}).get_json()
    assert view["status"] == "scheduled"
    assert view["enqueued_at"] is None
    assert fake_redis.zscore("rq:scheduled:default", view["id"]) is not None
    assert fake_redis.llen("rq:queue:default") == 0


def test_retries_back_off_increasingly(client, fake_redis):
    view = post(client, "log", {"message": "x", "retries": 4}).get_json()
    assert view["retries_left"] == 4
    job = Job.fetch(view["id"], connection=fake_redis)
    assert job.retry_intervals == sorted(job.retry_intervals)
    assert job.retry_intervals[0] < job.retry_intervals[-1]


# ------------------------------------------------------------------ bad input

BAD_BODIES = [
    # (type, raw body, content type, status, offending field or None)
    ("log", b"{", "application/json", 400, None),
    ("log", b'{"message": "x",}', "application/json", 400, None),
    ("sleep", b'{"seconds": NaN}', "application/json", 400, None),
    ("sleep", b'{"seconds": Infinity}', "application/json", 400, None),
    ("sleep", b'{"seconds": -Infinity}', "application/json", 400, None),
    ("sleep", b'{"seconds": 1e400}', "application/json", 400, None),
    ("log", b'{"message": "\xff\xfe"}', "application/json", 400, None),
    ("log", b"[" * 100_000 + b"]" * 100_000, "application/json", 422, ""),
    ("log", b'{"message": "x"}', "text/plain", 415, None),
    ("log", b'{"message": "x"}', "application/x-www-form-urlencoded", 415, None),
    ("log", b'{"message": "x"}', None, 415, None),
    ("log", b"[]", "application/json", 422, ""),
    ("log", b'"message"', "application/json", 422, ""),
    ("log", b"{}", "application/json", 422, "message"),
    ("log", b'{"message": ""}', "application/json", 422, "message"),
    ("log", b'{"message": 5}', "application/json", 422, "message"),
    ("log", b'{"message": null}', "application/json", 422, "message"),
    ("log", json.dumps({"message": "x" * 10_001}).encode(), "application/json", 422, "message"),
    ("log", b'{"message": "x", "level": "loud"}', "application/json", 422, "level"),
    ("log", b'{"message": "x", "colour": "red"}', "application/json", 422, "colour"),
    ("log", b'{"message": "x", "queue": "urgent"}', "application/json", 422, "queue"),
    ("log", b'{"message": "x", "timeout": 0}', "application/json", 422, "timeout"),
    ("log", b'{"message": "x", "timeout": 1.5}', "application/json", 422, "timeout"),
    ("log", b'{"message": "x", "timeout": true}', "application/json", 422, "timeout"),
    ("log", b'{"message": "x", "timeout": 999999}', "application/json", 422, "timeout"),
    ("log", b'{"message": "x", "retries": 11}', "application/json", 422, "retries"),
    ("log", b'{"message": "x", "retries": -1}', "application/json", 422, "retries"),
    ("log", b'{"message": "x", "retries": "2"}', "application/json", 422, "retries"),
    ("log", b'{"message": "x", "delay": -1}', "application/json", 422, "delay"),
    ("log", b'{"message": "x", "delay": 99999999}', "application/json", 422, "delay"),
    ("sleep", b'{"seconds": true}', "application/json", 422, "seconds"),
    ("sleep", b'{"seconds": "5"}', "application/json", 422, "seconds"),
    ("sleep", b'{"seconds": 0}', "application/json", 422, "seconds"),
    ("sleep", b'{"seconds": -3}', "application/json", 422, "seconds"),
    ("sleep", b'{"seconds": 3601}', "application/json", 422, "seconds"),
    ("sleep", b'{"seconds": 1' + b"0" * 5000 + b"}", "application/json", 400, None),
]


@pytest.mark.parametrize(("type_name", "raw", "content_type", "status", "field"), BAD_BODIES)
def test_bad_bodies_get_json_errors(client, fake_redis, type_name, raw, content_type, status, field):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(f"/jobs/{type_name}", data=raw, headers=headers)
    error = assert_error(response, status)
    if field is not None:
        assert field in [detail["field"] for detail in error["details"]]
    assert not fake_redis.keys("rq:*"), "a refused request must not enqueue anything"


def test_every_bad_field_is_reported_at_once(client):
    error = assert_error(post(client, "sleep", {"seconds": 0, "queue": "x", "retries": 99}), 422)
    assert {d["field"] for d in error["details"]} == {"seconds", "queue", "retries"}


def test_unknown_job_type_is_404(client):
    error = assert_error(post(client, "rm-rf", {}), 404, "unknown_job_type")
    assert "log" in error["details"]["known_types"]


def test_body_over_the_limit_is_413(fake_redis, tmp_path):
    from service import create_app

    app = create_app({"max_body_bytes": 1000, "log_file": str(tmp_path / "l"), "search_warmup": 0})
    response = app.test_client().post("/jobs/log", json={"message": "x" * 2000})
    error = assert_error(response, 413, "payload_too_large")
    assert "1000" in error["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/0123456789abcdef0123456789abcdef",
        "/jobs/" + "a" * 5000,
        "/jobs/..%2F..%2Fetc%2Fpasswd",
        "/jobs/../../etc/passwd",
        "/jobs/rq:job:x",
        "/jobs/%00",
        "/jobs/%C3%A9t%C3%A9",
        "/jobs/a/b/c",
        "/no/such/route",
    ],
)
def test_unknown_ids_and_routes_are_404(client, path):
    assert_error(client.get(path), 404, "not_found")


def test_unknown_id_on_every_job_route_is_404(client):
    missing = "f" * 32
    assert_error(client.delete(f"/jobs/{missing}"), 404)
    assert_error(client.post(f"/jobs/{missing}/retry"), 404)


def test_wrong_method_is_405_json(client):
    response = client.put("/jobs/log", json={})
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("wait", ["61", "-1", "abc", "nan", "inf"])
def test_bad_wait_is_422(client, wait):
    view = post(client, "log", {"message": "x"}).get_json()
    error = assert_error(client.get(f"/jobs/{view['id']}?wait={wait}"), 422)
    assert error["details"][0]["field"] == "wait"


# ------------------------------------------------------------------ idempotency


def test_idempotent_repeat_returns_the_same_job(client, fake_redis):
    headers = {"Idempotency-Key": "order-42"}
    first = post(client, "log", {"message": "once"}, headers=headers)
    second = post(client, "log", {"message": "once"}, headers=headers)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.get_json()["id"] == first.get_json()["id"]
    assert second.headers["Location"] == first.headers["Location"]
    assert fake_redis.llen("rq:queue:default") == 1


def test_idempotency_key_with_another_body_is_422(client, fake_redis):
    headers = {"Idempotency-Key": "order-43"}
    first = post(client, "log", {"message": "once"}, headers=headers).get_json()
    error = assert_error(
        post(client, "log", {"message": "twice"}, headers=headers), 422, "idempotency_key_reused"
    )
    assert error["details"]["job_id"] == first["id"]
    assert_error(post(client, "sleep", {"seconds": 1}, headers=headers), 422, "idempotency_key_reused")
    assert fake_redis.llen("rq:queue:default") == 1


def test_idempotency_keys_are_remembered_a_day(client, fake_redis):
    post(client, "log", {"message": "x"}, headers={"Idempotency-Key": "k"})
    assert fake_redis.ttl(keys.idempotency("public", "k")) >= 24 * 3600 - 5


def test_different_keys_make_different_jobs(client):
    a = post(client, "log", {"message": "x"}, headers={"Idempotency-Key": "a"}).get_json()
    b = post(client, "log", {"message": "x"}, headers={"Idempotency-Key": "b"}).get_json()
    assert a["id"] != b["id"]


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_bad_idempotency_key_is_422(client, key):
    assert_error(post(client, "log", {"message": "x"}, headers={"Idempotency-Key": key}), 422)


# ------------------------------------------------------------------ listing, cancel, retry


def test_list_is_newest_first_and_filters(client):
    ids = [
        post(client, "log", {"message": str(i), "queue": q}).get_json()["id"]
        for i, q in enumerate(["default", "high", "default", "low"])
    ]
    listed = client.get("/jobs").get_json()["jobs"]
    assert [job["id"] for job in listed] == ids[::-1]
    high = client.get("/jobs?queue=high").get_json()["jobs"]
    assert [job["id"] for job in high] == [ids[1]]
    assert len(client.get("/jobs?limit=2").get_json()["jobs"]) == 2
    client.delete(f"/jobs/{ids[0]}")
    canceled = client.get("/jobs?status=canceled").get_json()["jobs"]
    assert [job["id"] for job in canceled] == [ids[0]]


def test_the_recent_jobs_index_is_trimmed_now_and_then(client, fake_redis, monkeypatch):
    index = keys.recent_jobs("public")
    fake_redis.zadd(index, {"0" * 32: 1.0})  # an id whose job expired long ago
    monkeypatch.setattr("jobs.submission.random.randrange", lambda n: n - 1)  # most submissions
    post(client, "log", {"message": "x"})
    assert fake_redis.zscore(index, "0" * 32) == 1.0
    monkeypatch.setattr("jobs.submission.random.randrange", lambda n: 0)  # one in TRIM_EVERY
    post(client, "log", {"message": "x"})
    assert fake_redis.zscore(index, "0" * 32) is None
    assert fake_redis.zcard(index) == 2


@pytest.mark.parametrize(
    "query", ["status=done", "queue=urgent", "limit=0", "limit=201", "limit=x", "color=red"]
)
def test_bad_list_query_is_422(client, query):
    assert_error(client.get(f"/jobs?{query}"), 422)


def test_cancel_queued_job(client, fake_redis):
    view = post(client, "log", {"message": "x"}).get_json()
    response = client.delete(f"/jobs/{view['id']}")
    assert response.status_code == 200
    assert response.get_json()["status"] == "canceled"
    assert fake_redis.llen("rq:queue:default") == 0
    # Canceling again: the job has ended, like any other.
    assert_error(client.delete(f"/jobs/{view['id']}"), 409, "conflict")


def test_cancel_scheduled_job(client, fake_redis):
    view = post(client, "log", {"message": "x", "delay": 60}).get_json()
    assert client.delete(f"/jobs/{view['id']}").get_json()["status"] == "canceled"
    assert fake_redis.zcard("rq:scheduled:default") == 0


@pytest.mark.parametrize(
    "status", [JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED]
)
def test_cancel_ended_job_is_409(client, fake_redis, status):
    view = post(client, "log", {"message": "x"}).get_json()
    fake_redis.hset(f"rq:job:{view['id']}", "status", status.value)
    assert_error(client.delete(f"/jobs/{view['id']}"), 409, "conflict")


def test_retry_needs_a_failed_or_stopped_job(client):
    view = post(client, "log", {"message": "x"}).get_json()
    assert_error(client.post(f"/jobs/{view['id']}/retry"), 409, "conflict")


# ------------------------------------------------------------------ readiness and outages


def test_readyz_without_workers_is_200_and_says_so(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    ready = response.get_json()
    assert ready["checks"] == {
        "redis": "ok",
        "redis_eviction_policy": ready["checks"]["redis_eviction_policy"],
        "search": "off",
        "workers": 0,
        "embedders": 0,
    }
    assert any("No worker process is alive" in warning for warning in ready["warnings"])
    assert any("No embedder process is alive" in warning for warning in ready["warnings"])


def test_readyz_counts_live_workers_and_embedders_apart(client, fake_redis):
    from rq.utils import now, utcformat

    for name, queues in (
        ("w1", "high,default,low"),
        ("w2", "high,default,low"),
        ("e1", "embed-high,embed-default,embed-low"),
    ):
        fake_redis.sadd("rq:workers", f"rq:worker:{name}")
        fake_redis.hset(
            f"rq:worker:{name}",
            mapping={"state": "idle", "last_heartbeat": utcformat(now()), "queues": queues},
        )
    ready = client.get("/readyz").get_json()
    assert (ready["checks"]["workers"], ready["checks"]["embedders"]) == (2, 1)
    assert ready["warnings"] == [] or all("process is alive" not in warning for warning in ready["warnings"])
    fake_redis.hset("rq:worker:e1", "death", "2026-01-01T00:00:00Z")
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["checks"]["embedders"] == 0
    assert any("No embedder process" in warning for warning in response.get_json()["warnings"])


def test_redis_down_is_503_with_retry_after(tmp_path):
    from scripts.embedded_redis import free_port
    from service import create_app

    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app({"redis_url": unreachable, "log_file": str(tmp_path / "l"), "search_warmup": 0})
    client = app.test_client()
    for response in (
        client.post("/jobs/log", json={"message": "x"}),
        client.get("/jobs/" + "a" * 32),
        client.get("/jobs"),
    ):
        error = assert_error(response, 503, "redis_unavailable")
        assert "127.0.0.1" not in error["message"]
        assert int(response.headers["Retry-After"]) > 0
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["error"]["details"]["checks"]["redis"] == "unreachable"
    assert client.get("/healthz").status_code == 200


def test_idempotency_key_claimed_by_a_request_still_in_flight_is_409(client, fake_redis):
    import json as json_module
    import time

    key = keys.idempotency("public", "in-flight")
    body = {"message": "x"}
    first = post(client, "log", body, headers={"Idempotency-Key": "in-flight"}).get_json()
    record = json_module.loads(fake_redis.get(key))
    fake_redis.delete(f"rq:job:{first['id']}")  # as if the first request had not written its job yet
    response = post(client, "log", body, headers={"Idempotency-Key": "in-flight"})
    assert_error(response, 409, "conflict")
    assert response.headers["Retry-After"] == "1"
    # A claim whose job never appeared is taken over once it is old enough.
    record["at"] = time.time() - 3600
    fake_redis.set(key, json_module.dumps(record))
    taken_over = post(client, "log", body, headers={"Idempotency-Key": "in-flight"})
    assert taken_over.status_code == 202
    assert taken_over.get_json()["id"] != first["id"]


def test_readyz_says_search_is_warming_until_it_is_loaded(fake_redis, tmp_path, monkeypatch):
    from service import create_app

    monkeypatch.setattr("service.search.SearchService.start_background", lambda self: None)
    app = create_app({"log_file": str(tmp_path / "l"), "search_warmup": 1})
    fake_redis.hset("rq:worker:w1", mapping={"state": "idle", "last_heartbeat": iso(now())})
    fake_redis.sadd("rq:workers", "rq:worker:w1")
    error = assert_error(app.test_client().get("/readyz"), 503, "not_ready")
    assert error["details"]["checks"]["search"] == "warming"
    assert any("warming" in reason for reason in error["details"]["reasons"])
