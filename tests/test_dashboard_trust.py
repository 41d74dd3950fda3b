"""Whom the dashboard trusts: credentials everywhere, DASHBOARD_OPEN only for this machine."""

from __future__ import annotations

import logging

import pytest

from tests.test_api import assert_error
from tests.test_security import basic, failed_job, make_app


@pytest.fixture
def open_local(fake_redis, tmp_path):
    return make_app(tmp_path, dashboard_open=1).test_client()


@pytest.mark.parametrize("host", ["localhost", "localhost:5000", "127.0.0.1", "127.0.0.1:8080", "[::1]:5000"])
@pytest.mark.parametrize("remote", ["127.0.0.1", "::1"])
def test_dashboard_open_answers_local_requests(open_local, host, remote):
    response = open_local.get("/rq/", headers={"Host": host}, environ_base={"REMOTE_ADDR": remote})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("remote", "headers"),
    [
        # Another machine.
        ("203.0.113.9", {"Host": "localhost:5000"}),
        # DNS rebinding: a page on evil.example, its name now resolving to 127.0.0.1.
        ("127.0.0.1", {"Host": "evil.example:5000"}),
        ("127.0.0.1", {"Host": "127.0.0.1.evil.example"}),
        # A reverse proxy on this machine, passing on a visitor's request.
        ("127.0.0.1", {"Host": "afterward.example.com"}),
        ("127.0.0.1", {"Host": "127.0.0.1:5000", "X-Forwarded-For": "203.0.113.9"}),
        ("127.0.0.1", {"Host": "localhost", "Forwarded": "for=203.0.113.9"}),
        ("127.0.0.1", {"Host": "localhost", "X-Real-IP": "203.0.113.9"}),
    ],
)
def test_dashboard_open_refuses_everyone_else(open_local, remote, headers):
    response = open_local.get("/rq/", headers=headers, environ_base={"REMOTE_ADDR": remote})
    assert "localhost" in assert_error(response, 403, "forbidden")["message"]


def test_a_rebound_name_cannot_act_on_an_open_dashboard(open_local, fake_redis):
    # The page's Origin matches the Host it sent, and its fetch is same-origin to the browser.
    job_id = failed_job(open_local)
    origin = {
        "Host": "evil.example:5000",
        "Origin": "http://evil.example:5000",
        "Sec-Fetch-Site": "same-origin",
    }
    assert_error(open_local.post(f"/rq/job/{job_id}/delete", headers=origin), 403)
    assert fake_redis.exists(f"rq:job:{job_id}")


def test_credentials_win_over_dashboard_open(fake_redis, tmp_path):
    client = make_app(
        tmp_path, dashboard_open=1, dashboard_user="ops", dashboard_password="s3cret"
    ).test_client()
    assert_error(client.get("/rq/"), 401, "unauthorized")
    assert client.get("/rq/", headers=basic("ops", "s3cret")).status_code == 200


def test_dashboard_open_is_logged_at_boot(fake_redis, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        make_app(tmp_path, dashboard_open=1)
    assert any("DASHBOARD_OPEN=1" in record.message for record in caplog.records)


@pytest.mark.parametrize(
    ("method", "path", "auth", "status"),
    [
        ("GET", "/rq/", True, 200),
        ("GET", "/rq/0/view/workers", True, 200),
        ("GET", "/rq/0/data/queues.json", True, 200),
        ("GET", "/rq/static/js/jquery-3.5.1.min.js", True, 200),
        ("GET", "/rq/", False, 401),
        ("GET", "/rq/0/view/job/nope", True, 404),
        ("GET", "/rq/no/such/page", True, 404),
        ("GET", "/rq/requeue/default", True, 405),
    ],
)
def test_every_dashboard_answer_refuses_framing(fake_redis, tmp_path, method, path, auth, status):
    client = make_app(tmp_path, dashboard_user="ops", dashboard_password="s3cret").test_client()
    response = client.open(path, method=method, headers=basic("ops", "s3cret") if auth else {})
    assert response.status_code == status
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    response.close()
