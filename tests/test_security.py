"""API keys, job ownership, rate limits, the dashboard's guard and the configurable limits."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from rq.job import JobStatus

from jobs.engine.errors import describe_exception
from jobs.engine.job import Job
from jobs.settings import Settings
from service import create_app
from tests.test_api import assert_error

KEY_A, KEY_B = "key-alpha-0123456789", "key-beta-9876543210"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def make_app(tmp_path, **overrides):
    config = {
        "search_warmup": 0,
        "log_file": str(tmp_path / "jobs.log"),
        "extra_job_modules": ("tests.fixtures",),
    }
    config.update(overrides)
    return create_app(config)


@pytest.fixture
def keyed(fake_redis, tmp_path):
    return make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()


# ------------------------------------------------------------------ API keys


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY_A}x"},
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": KEY_A},
        {"Authorization": "Bearer "},
    ],
)
def test_the_api_needs_a_valid_key(keyed, fake_redis, headers):
    for response in (
        keyed.post("/jobs/log", json={"message": "x"}, headers=headers),
        keyed.get("/jobs", headers=headers),
        keyed.get("/search?q=x", headers=headers),
        keyed.get("/index", headers=headers),
    ):
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert fake_redis.llen("rq:queue:default") == 0


def test_probes_stay_open_with_keys(keyed):
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").get_json()["checks"]["redis"] == "ok"  # answered, not refused


def test_a_job_is_visible_only_to_its_key(keyed):
    view = keyed.post("/jobs/log", json={"message": "mine"}, headers=A).get_json()
    path = f"/jobs/{view['id']}"
    assert keyed.get(path, headers=A).status_code == 200
    assert_error(keyed.get(path, headers=B), 404)
    assert_error(keyed.delete(path, headers=B), 404)
    assert_error(keyed.post(f"{path}/retry", headers=B), 404)
    assert keyed.get("/jobs", headers=B).get_json()["jobs"] == []
    assert [j["id"] for j in keyed.get("/jobs", headers=A).get_json()["jobs"]] == [view["id"]]
    # The job records a name for the key, never the key itself.
    assert KEY_A not in json.dumps(keyed.get(path, headers=A).get_json())


def test_idempotency_keys_are_per_api_key(keyed):
    a = keyed.post("/jobs/log", json={"message": "x"}, headers={**A, "Idempotency-Key": "k"}).get_json()
    b = keyed.post("/jobs/log", json={"message": "x"}, headers={**B, "Idempotency-Key": "k"}).get_json()
    assert a["id"] != b["id"]


# Routes that answer without a key when API_KEYS is set (docs/security.md's list). The spec and its
# docs page are public on purpose: shapes, no data; Swagger UI loads the spec before a key is
# entered. Flask's own /static serves nothing here (the app has no static folder).
KEYLESS_ROUTES = {
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/docs/",
    "/docs/<path:path>",
    "/static/<path:filename>",
    "/favicon.ico",
}


def test_only_the_documented_routes_answer_without_a_key(keyed):
    app = keyed.application
    keyless = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("rq_dashboard."):
            continue  # its own credentials: tests/test_dashboard_trust.py
        path = rule.rule
        for name in rule.arguments:
            path = path.replace(f"<{name}>", "x").replace(f"<path:{name}>", "x")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            response = keyed.open(path, method=method, json={} if method == "POST" else None)
            if response.status_code != 401:
                keyless.add(rule.rule)
            response.close()
    assert keyless == KEYLESS_ROUTES
    spec = keyed.get("/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert KEY_A not in json.dumps(spec) and "redis://" not in json.dumps(spec)
    assert "/openapi.json" in keyed.get("/docs/").get_data(as_text=True)


def test_an_open_api_says_so_loudly_at_boot(fake_redis, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        make_app(tmp_path)
    assert any("API_KEYS is not set" in record.message for record in caplog.records)


# ------------------------------------------------------------------ rate limits


def test_rate_limit_per_key_with_retry_after(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="3 per minute").test_client()
    for _ in range(3):
        assert client.get("/jobs", headers=A).status_code == 200
    response = client.get("/jobs", headers=A)
    error = assert_error(response, 429, "too_many_requests")
    assert "3 per 1 minute" in error["message"]
    assert 0 < int(response.headers["Retry-After"]) <= 60
    # Every route of the API shares the budget; other keys and the probes are not affected.
    assert_error(client.post("/jobs/log", json={"message": "x"}, headers=A), 429)
    assert client.get("/jobs", headers=B).status_code == 200
    assert client.get("/healthz").status_code == 200


# ------------------------------------------------------------------ failed authentications

ATTACKER, OTHER = {"REMOTE_ADDR": "203.0.113.9"}, {"REMOTE_ADDR": "198.51.100.7"}


def test_failed_api_keys_are_limited_per_address(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), auth_failure_limit="3 per minute").test_client()
    for n in range(3):
        assert_error(
            client.get("/jobs", headers={"Authorization": f"Bearer guess-{n}"}, environ_base=ATTACKER), 401
        )
    response = client.get("/jobs", headers={"Authorization": "Bearer guess-3"}, environ_base=ATTACKER)
    assert "failed authentications" in assert_error(response, 429, "too_many_requests")["message"]
    assert 0 < int(response.headers["Retry-After"]) <= 60
    # Blocked means blocked: the right key from there would otherwise tell the guesser so.
    for headers in (A, {}):
        assert_error(client.get("/jobs", headers=headers, environ_base=ATTACKER), 429)
    assert_error(client.get("/metrics", headers=A, environ_base=ATTACKER), 429)
    # Another address is not affected, nor are the probes.
    assert client.get("/jobs", headers=A, environ_base=OTHER).status_code == 200
    assert client.get("/healthz", environ_base=ATTACKER).status_code == 200


def test_requests_without_credentials_are_not_counted_as_failures(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), auth_failure_limit="3 per minute").test_client()
    for _ in range(10):
        assert_error(client.get("/jobs", environ_base=ATTACKER), 401)
    assert client.get("/jobs", headers=A, environ_base=ATTACKER).status_code == 200


def test_failed_dashboard_logins_are_limited_per_address(fake_redis, tmp_path):
    client = make_app(
        tmp_path, dashboard_user="ops", dashboard_password="s3cret", auth_failure_limit="3 per minute"
    ).test_client()
    for n in range(3):
        assert_error(client.get("/rq/", headers=basic("ops", f"guess-{n}"), environ_base=ATTACKER), 401)
    response = client.get("/rq/", headers=basic("ops", "guess-3"), environ_base=ATTACKER)
    assert_error(response, 429, "too_many_requests")
    assert response.headers["Retry-After"] and response.headers["X-Frame-Options"] == "DENY"
    assert_error(client.get("/rq/", headers=basic("ops", "s3cret"), environ_base=ATTACKER), 429)
    assert client.get("/rq/", headers=basic("ops", "s3cret"), environ_base=OTHER).status_code == 200


def test_failed_authentications_count_across_web_processes(fake_redis, tmp_path):
    # Two apps on one Redis: two web processes. Failures on one count on the other.
    first, second = (
        make_app(tmp_path, api_keys=(KEY_A,), auth_failure_limit="3 per minute").test_client()
        for _ in range(2)
    )
    for n in range(3):
        assert_error(first.get("/jobs", headers={"Authorization": f"Bearer {n}"}, environ_base=ATTACKER), 401)
    assert_error(second.get("/jobs", headers={"Authorization": "Bearer 3"}, environ_base=ATTACKER), 429)
    assert_error(second.get("/jobs", headers=A, environ_base=ATTACKER), 429)


def test_failed_authentication_limit_can_be_switched_off(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), auth_failure_limit="off").test_client()
    for n in range(30):
        assert_error(
            client.get("/jobs", headers={"Authorization": f"Bearer {n}"}, environ_base=ATTACKER), 401
        )
    assert client.get("/jobs", headers=A, environ_base=ATTACKER).status_code == 200


def test_failed_authentications_without_redis_are_still_401(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), auth_failure_limit="1 per minute").test_client()
    fake_redis.connection_pool.connection_kwargs["server"].connected = False
    for n in range(3):
        assert_error(
            client.get("/jobs", headers={"Authorization": f"Bearer {n}"}, environ_base=ATTACKER), 401
        )


def test_the_default_failed_authentication_limit():
    assert Settings.from_env({}).auth_failure_limit == "20 per minute"
    assert Settings.from_env({"AUTH_FAILURE_LIMIT": "5 per second"}).auth_failure_limit == "5 per second"


# ------------------------------------------------------------------ the dashboard's guard


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def guarded(fake_redis, tmp_path):
    return make_app(tmp_path, dashboard_user="ops", dashboard_password="s3cret").test_client()


@pytest.mark.parametrize("headers", [{}, basic("ops", "wrong"), basic("admin", "s3cret"), basic("ops", "")])
def test_dashboard_needs_its_credentials(guarded, headers):
    response = guarded.get("/rq/", headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_dashboard_opens_with_its_credentials(guarded):
    response = guarded.get("/rq/", headers=basic("ops", "s3cret"))
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert "redis://" not in response.get_data(as_text=True)


def test_dashboard_without_credentials_answers_no_one(fake_redis, tmp_path):
    # Not even a loopback client: a reverse proxy on this machine is one for every visitor.
    client = make_app(tmp_path).test_client()
    for remote in ("127.0.0.1", "::1", "203.0.113.9"):
        error = assert_error(client.get("/rq/", environ_base={"REMOTE_ADDR": remote}), 403, "forbidden")
        assert "DASHBOARD_USER" in error["message"] and "DASHBOARD_OPEN" in error["message"]


def failed_job(client, headers=None):
    view = client.post("/jobs/log", json={"message": "x"}, headers=headers or {}).get_json()
    return view["id"]


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"}, True),
        ({}, True),  # not a browser
        ({"Sec-Fetch-Site": "cross-site"}, False),
        ({"Sec-Fetch-Site": "same-site"}, False),
        ({"Origin": "https://evil.example"}, False),
        ({"Origin": "http://localhost"}, True),
    ],
)
def test_dashboard_actions_refuse_cross_site_requests(guarded, fake_redis, headers, allowed):
    job_id = failed_job(guarded)
    response = guarded.post(f"/rq/job/{job_id}/delete", headers={**basic("ops", "s3cret"), **headers})
    if allowed:
        assert response.status_code == 200
        assert not fake_redis.exists(f"rq:job:{job_id}")
    else:
        assert_error(response, 403, "cross_site_refused")
        assert fake_redis.exists(f"rq:job:{job_id}")


def test_dashboard_requeue_all_refuses_get(guarded):
    response = guarded.get("/rq/requeue/default", headers=basic("ops", "s3cret"))
    assert_error(response, 405)


def test_dashboard_reads_and_requeues_json_jobs_without_pickle(guarded, fake_redis):
    auth = basic("ops", "s3cret")
    job_id = failed_job(guarded)
    job = Job.fetch(job_id, connection=fake_redis)
    job.meta["progress"] = {"percent": 40.0, "message": "4 of 10 <b>steps</b>"}
    job.save_meta()
    fake_redis.lrem("rq:queue:default", 0, job_id)  # a worker took it...
    with fake_redis.pipeline() as pipe:  # ...and recorded its failure
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        job._handle_failure("ValueError: <script>alert(1)</script>", pipeline=pipe)
        pipe.execute()

    detail = guarded.get(f"/rq/0/data/job/{job_id}.json", headers=auth).get_json()
    assert "40%" in detail["description"]  # progress shows in the job's detail
    assert "<script>" not in json.dumps(detail) and "&lt;script&gt;" in detail["exc_info"]
    assert "&lt;b&gt;steps" in detail["metadata"]

    assert guarded.post(f"/rq/job/{job_id}/requeue", headers=auth).status_code == 200
    assert fake_redis.lrange("rq:queue:default", 0, -1).count(job_id.encode()) == 1
    meta = fake_redis.hget(f"rq:job:{job_id}", "meta")
    meta = json.loads(meta)  # still JSON, never pickled
    assert meta["type"] and "progress" not in meta  # reset as POST /jobs/<id>/retry resets it


def test_dashboard_unknown_job_is_404(guarded):
    assert_error(guarded.get("/rq/0/view/job/nope", headers=basic("ops", "s3cret")), 404)


# ------------------------------------------------------------------ hardening


def test_debug_mode_cannot_be_switched_on_by_the_environment(fake_redis, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    app = make_app(tmp_path)
    assert app.debug is False

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail at /srv/app/x.py")

    response = app.test_client().get("/boom")
    error = assert_error(response, 500, "internal_error")
    assert "secret" not in json.dumps(error) and "/srv" not in response.get_data(as_text=True)


def test_the_procfile_web_process_has_no_debug_or_reload():
    from tests.support import procfile_command

    web = procfile_command("web")
    assert "gunicorn" in web
    assert "debug" not in web.lower() and "--reload" not in web


LIMITS = [
    ("max_log_chars", 5, "log", {"message": "x" * 6}, "message"),
    ("max_sleep_seconds", 10, "sleep", {"seconds": 11}, "seconds"),
    ("max_job_timeout", 30, "log", {"message": "x", "timeout": 31}, "timeout"),
    ("max_delay", 30, "log", {"message": "x", "delay": 31}, "delay"),
    ("max_documents", 2, "embed", {"documents": [{"text": "a"}, {"text": "b"}, {"text": "c"}]}, "documents"),
    ("max_text_chars", 5, "embed", {"text": "x" * 6}, "documents.0.text"),
    ("max_metadata_bytes", 20, "embed", {"text": "x", "metadata": {"k": "v" * 20}}, "documents.0.metadata"),
]


@pytest.mark.parametrize(("setting", "value", "type_name", "body", "field"), LIMITS)
def test_every_limit_is_configurable_and_answers_422(
    fake_redis, tmp_path, setting, value, type_name, body, field
):
    client = make_app(tmp_path, **{setting: value}).test_client()
    error = assert_error(client.post(f"/jobs/{type_name}", json=body), 422, "validation_failed")
    assert field in [d["field"] for d in error["details"]]


def test_search_limits_are_configurable(fake_redis, tmp_path):
    client = make_app(tmp_path, max_k=5, max_query_chars=10, max_text_chars=20).test_client()
    assert_error(client.get("/search?q=x&k=6"), 422)
    assert_error(client.get("/search?q=" + "x" * 11), 422)
    assert_error(client.post("/search", json={"query": "x" * 21}), 422)


def test_body_limit_is_configurable(fake_redis, tmp_path):
    client = make_app(tmp_path, max_body_bytes=100).test_client()
    assert_error(client.post("/jobs/log", json={"message": "x" * 200}), 413)


def test_job_errors_leave_out_paths_and_redis_details(fake_redis):
    import redis

    job = Job.create("jobs.types.log.write_log", kwargs={"message": "x"}, connection=fake_redis)
    error = describe_exception(job, PermissionError(13, "Permission denied", "/var/lib/afterward/jobs.log"))
    assert "/var" not in error["message"] and "<path>" in error["message"]
    error = describe_exception(
        job, redis.exceptions.ConnectionError("Error 111 connecting to 10.0.0.7:6379.")
    )
    assert "10.0.0.7" not in error["message"] and error["type"] == "StoreError"
