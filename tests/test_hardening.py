"""Hostile inputs, each sent exactly: answers are JSON 4xx errors, never 500s; logs stay safe lines."""

from __future__ import annotations

import re

import pytest

from tests.test_api import assert_error

JOB_ID = "0123456789abcdef0123456789abcdef"


def nested(depth: int, leaf: str = "1") -> str:
    """JSON text of `depth` objects, each the only value of the one before: {"a": {"a": … 1}}."""
    return '{"a":' * depth + leaf + "}" * depth


def post_raw(client, path: str, raw: str | bytes):
    return client.post(path, data=raw, headers={"Content-Type": "application/json"})


# ---------------------------------------------------------------- ids ending in a newline


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/jobs/{id}%0A"),
        ("GET", "/jobs/{id}%0A?wait=1"),
        ("DELETE", "/jobs/{id}%0A"),
        ("POST", "/jobs/{id}%0A/retry"),
        ("GET", "/documents/doc%0A"),
        ("DELETE", "/documents/doc%0A"),
    ],
)
def test_an_id_with_a_trailing_newline_is_404_not_500(client, method, path):
    # Python's `$` also matches before a final newline: ids are checked with fullmatch.
    job = client.post("/jobs/sleep", json={"seconds": 1}).get_json()
    response = client.open(path.format(id=job["id"]), method=method)
    assert_error(response, 404, "not_found")
    response = client.open(path.format(id=JOB_ID), method=method)
    assert_error(response, 404, "not_found")


def test_a_document_id_with_a_trailing_newline_is_refused(client):
    response = post_raw(client, "/jobs/embed", '{"documents": [{"id": "doc\\n", "text": "x"}]}')
    error = assert_error(response, 422, "validation_failed")
    assert [detail["field"] for detail in error["details"]] == ["documents.0.id"]


def test_a_request_id_with_a_trailing_newline_is_replaced(client):
    response = client.get("/healthz", environ_overrides={"HTTP_X_REQUEST_ID": "abc\n"})
    assert response.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
