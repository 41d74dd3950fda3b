"""Embed requests and the search routes on fakeredis: validation and answers without the model."""

from __future__ import annotations

import re

import pytest

from tests.test_api import assert_error, post


def fields(error: dict) -> list[str]:
    return [detail["field"] for detail in error["details"]]


def test_embed_shorthand_is_one_document_with_a_server_id(client, fake_redis):
    response = post(client, "embed", {"text": "hello", "metadata": {"lang": "en"}})
    assert response.status_code == 202
    view = response.get_json()
    assert view["type"] == "embed"
    assert view["queue"] == "embed-default"  # the RQ queue it is on, as GET /queues names it
    (doc_id,) = view["document_ids"]
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,256}", doc_id)
    # Embedding has queues of its own, served by the `embedder` process type.
    assert fake_redis.lrange("rq:queue:embed-default", 0, -1) == [view["id"].encode()]


def test_embed_keeps_given_ids_and_assigns_missing_ones(client):
    view = post(
        client, "embed", {"documents": [{"id": "a:1", "text": "x"}, {"text": "y"}], "queue": "high"}
    ).get_json()
    assert view["document_ids"][0] == "a:1"
    assert view["document_ids"][1] != "a:1"
    assert view["queue"] == "embed-high"


def test_embed_replay_keeps_the_assigned_ids(client):
    headers = {"Idempotency-Key": "embed-1"}
    first = post(client, "embed", {"text": "same"}, headers=headers).get_json()
    again = post(client, "embed", {"text": "same"}, headers=headers)
    assert again.status_code == 200
    assert again.get_json()["document_ids"] == first["document_ids"]


BAD_EMBEDS = [
    ({}, "documents"),
    ({"documents": []}, "documents"),
    ({"documents": "text"}, "documents"),
    ({"documents": [{"text": ""}]}, "documents.0.text"),
    ({"documents": [{"text": "   "}]}, "documents.0.text"),
    ({"documents": [{"text": 5}]}, "documents.0.text"),
    ({"documents": [{"text": "x" * 10_001}]}, "documents.0.text"),
    ({"documents": [{"id": "has space", "text": "x"}]}, "documents.0.id"),
    ({"documents": [{"id": "é", "text": "x"}]}, "documents.0.id"),
    ({"documents": [{"id": "", "text": "x"}]}, "documents.0.id"),
    ({"documents": [{"id": "a" * 257, "text": "x"}]}, "documents.0.id"),
    ({"documents": [{"id": "../etc", "text": "x"}]}, "documents.0.id"),
    ({"documents": [{"text": "x", "metadata": ["a"]}]}, "documents.0.metadata"),
    ({"documents": [{"text": "x", "metadata": {"blob": "x" * 3000}}]}, "documents.0.metadata"),
    ({"documents": [{"text": "x", "colour": "red"}]}, "documents.0.colour"),
    ({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "documents"),
    ({"documents": [{"text": "x"}] * 257}, "documents"),
    ({"text": "x", "documents": [{"text": "y"}]}, "text"),
]


@pytest.mark.parametrize(("body", "field"), BAD_EMBEDS)
def test_bad_embed_requests_are_422(client, fake_redis, body, field):
    error = assert_error(post(client, "embed", body), 422, "validation_failed")
    assert field in fields(error)
    assert not fake_redis.keys("rq:*")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("", "q"),
        ("q=", "q"),
        ("q=%20%20", "q"),
        ("q=x&k=0", "k"),
        ("q=x&k=101", "k"),
        ("q=x&k=abc", "k"),
        ("q=x&k=1.5", "k"),
        ("q=x&colour=red", "colour"),
        ("q=" + "x" * 2001, "q"),
    ],
)
def test_bad_search_queries_are_422(client, query, field):
    error = assert_error(client.get(f"/search?{query}"), 422, "validation_failed")
    assert field in fields(error)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "query"),
        ({"query": ""}, "query"),
        ({"query": " "}, "query"),
        ({"query": 5}, "query"),
        ({"query": "x", "k": True}, "k"),
        ({"query": "x", "k": "5"}, "k"),
        ({"query": "x", "k": 0}, "k"),
        ({"query": "x", "filter": ["a"]}, "filter"),
        ({"query": "x", "extra": 1}, "extra"),
        ({"query": "x" * 10_001}, "query"),
    ],
)
def test_bad_search_bodies_are_422(client, body, field):
    error = assert_error(client.post("/search", json=body), 422, "validation_failed")
    assert field in fields(error)


def test_search_body_must_be_json(client):
    assert_error(client.post("/search", data="q", content_type="text/plain"), 415)
    assert_error(client.post("/search", data="{", content_type="application/json"), 400)


@pytest.mark.parametrize("doc_id", ["missing", "bad%20id", "a" * 300])
def test_unknown_documents_are_404(client, doc_id):
    assert_error(client.get(f"/documents/{doc_id}"), 404, "not_found")
    assert_error(client.delete(f"/documents/{doc_id}"), 404, "not_found")


def test_index_info_of_an_empty_index(client):
    info = client.get("/index").get_json()
    assert info["documents"] == 0
    assert info["dimensions"] == 384
    assert info["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["version"] == 0
    assert info["replica"]["status"] == "cold"


def test_the_web_app_and_regular_workers_do_not_import_torch_at_start():
    import subprocess
    import sys

    code = (
        "import sys; from service import create_app;"
        "import jobs.engine.worker, jobs.types.registry, tests.fixtures;"
        "create_app({'search_warmup': 0}); sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
