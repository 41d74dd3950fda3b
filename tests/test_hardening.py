"""Hostile inputs, each sent exactly: answers are JSON 4xx errors, never 500s; logs stay safe lines."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import time

import numpy as np
import pytest
from gunicorn.http.errors import InvalidChunkSize, NoMoreData

import scripts.run
from jobs import keys
from jobs.index.store import DocumentStore
from jobs.logs import UNSAFE_CODEPOINTS, formatter
from jobs.types.log import write_log
from scripts.run import redacted
from service.body import MAX_JSON_DEPTH
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


# ---------------------------------------------------------------- nesting depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 300, 500, 989, 5000])
def test_metadata_nested_too_deep_is_422(client, fake_redis, depth):
    # The shorthand body is level 1, its metadata level 2.
    response = post_raw(client, "/jobs/embed", '{"text": "hi", "metadata": ' + nested(depth) + "}")
    error = assert_error(response, 422, "validation_failed")
    assert f"{MAX_JSON_DEPTH} levels" in error["message"]
    [detail] = error["details"]
    assert detail["type"] == "too_deep"
    # Where it is when Python's parser could still read it (a few hundred levels).
    if depth < 500:
        assert detail["field"].startswith("metadata.a.a")
    assert not fake_redis.keys("rq:*")


def test_nesting_up_to_the_limit_is_accepted(client):
    response = post_raw(
        client, "/jobs/embed", '{"text": "hi", "metadata": ' + nested(MAX_JSON_DEPTH - 1) + "}"
    )
    assert response.status_code == 202, response.get_data(as_text=True)


def test_a_search_filter_nested_too_deep_is_422(client):
    response = post_raw(client, "/search", '{"query": "q", "filter": ' + nested(400) + "}")
    error = assert_error(response, 422, "validation_failed")
    assert error["details"][0]["field"].startswith("filter.a")


def test_a_deep_array_is_422_too(client):
    response = post_raw(client, "/jobs/log", '{"message": "x", "level": ' + "[" * 40 + "]" * 40 + "}")
    error = assert_error(response, 422, "validation_failed")
    # The body is level 1, `level` level 2: the path names the first array past the limit.
    assert error["details"][0]["field"] == "level" + ".0" * (MAX_JSON_DEPTH - 1)


# ---------------------------------------------------------------- bodies the server cannot read


class _BrokenChunks(io.RawIOBase):
    """wsgi.input as gunicorn's chunked reader behaves on a malformed body."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise self.error


@pytest.mark.parametrize("error", [InvalidChunkSize(b"zz"), NoMoreData(b"")])
def test_a_malformed_chunked_body_is_a_json_400(client, fake_redis, error):
    response = client.post(
        "/jobs/log",
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": _BrokenChunks(error), "wsgi.input_terminated": True},
    )
    error_body = assert_error(response, 400, "bad_request")
    assert "chunked" in error_body["message"]
    assert not fake_redis.keys("rq:*")


@pytest.mark.integration
@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",  # a chunk size that is not hexadecimal
        b"2\r\n{}XX0\r\n\r\n",  # a chunk without its CRLF
        b"10\r\n{}\r\n0\r\n\r\n",  # a chunk shorter than its size, then the connection closes
    ],
)
def test_a_malformed_chunked_body_through_gunicorn_is_a_json_400(web, real_redis, chunks):
    head = (
        b"POST /jobs/log HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as sock:
        sock.sendall(head + chunks)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 400"), received[:300]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"application/json" in headers.lower()
    assert json.loads(body)["error"]["code"] == "bad_request"


# ---------------------------------------------------------------- what reaches logs


# What must never reach a log unescaped: DEL, C1 controls (U+009B is a terminal's CSI),
# line separators and bidirectional overrides and isolates.
HOSTILE = "a\x7fb\x85c\x9b[31md\u202ee\u2066f\u2069g\u2028h\u2029i"
UNSAFE = re.compile("[" + "".join(map(chr, UNSAFE_CODEPOINTS)) + "]")


def test_the_log_job_escapes_terminal_controls_and_bidi_overrides(tmp_path, monkeypatch, capfdbinary):
    log_file = tmp_path / "jobs.log"
    monkeypatch.setenv("LOG_FILE", str(log_file))
    write_log(HOSTILE, "warning")
    line = log_file.read_text("utf-8")
    assert line.endswith("\n") and line.count("\n") == 1
    assert not UNSAFE.search(line), ascii(line)
    assert "\\u009b" in line and "\\u202e" in line and "\\u007f" in line
    assert json.loads(line)["message"] == HOSTILE  # escaped, not altered
    assert capfdbinary.readouterr().out.decode() == line


def test_structured_logs_escape_request_data():
    # The same formatter writes the app's events and gunicorn's access lines (request paths).
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, "GET %s 404", (HOSTILE,), None)
    record.request_id = None
    record.job_id = None
    line = formatter().format(record)
    assert not UNSAFE.search(line), ascii(line)
    assert json.loads(line)["message"] == f"GET {HOSTILE} 404"


@pytest.mark.integration
def test_a_hostile_request_path_reaches_the_web_log_escaped(web, real_redis):
    # Percent-encoded, the way a client sends it; the app decodes it, and its 404 is logged.
    marker = f"hostile-{time.monotonic_ns()}"
    encoded = "".join(f"%{byte:02X}" for byte in HOSTILE.encode())
    response = web.http.get(web.url(f"/documents/{marker}{encoded}"))
    assert response.status_code == 404
    deadline = time.monotonic() + 30
    while marker not in web.process.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in web.process.output().splitlines() if marker in line]
    assert lines
    for line in lines:
        assert not UNSAFE.search(line), ascii(line)
        json.loads(line)


# ---------------------------------------------------------------- make run and REDIS_URL


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@cache.internal:6380/2", "redis://:***@cache.internal:6380/2"),
        ("rediss://default:s3cret@cache.internal:6380", "rediss://default:***@cache.internal:6380"),
        ("redis://user:s3c:ret@host", "redis://user:***@host"),
        # Unencoded / ? # @ in a password: a URL parser leaves part of it outside the password.
        ("redis://:s3c/ret@host:6379", "redis://:***@host:6379"),
        ("redis://:s3c?ret@host", "redis://:***@host"),
        ("redis://:s3c#ret@host", "redis://:***@host"),
        ("redis://:s3c@ret@host", "redis://:***@host"),
        ("redis://host:6379/0?password=s3cret&db=1", "redis://host:6379/0?password=***&db=1"),
        ("unix:///tmp/redis.sock?PASSWORD=s3cret", "unix:///tmp/redis.sock?PASSWORD=***"),
        ("s3cret", "(not shown: not a redis://, rediss://, redis+sentinel:// or unix:// URL)"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
    ],
)
def test_redacted_never_shows_a_password(url, shown):
    assert redacted(url) == shown


@pytest.mark.parametrize("url", ["redis://:s3c/ret@host:6379", "redis://:s3c?ret@host", "s3cret"])
def test_make_run_stops_on_an_unusable_redis_url_without_printing_it(url, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("nothing may start on an unusable REDIS_URL")

    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setattr(scripts.run.subprocess, "run", must_not_run)
    monkeypatch.setattr(scripts.run.subprocess, "Popen", must_not_run)
    monkeypatch.setattr(scripts.run, "choose_redis", must_not_run)
    assert scripts.run.main() == 2
    out, err = capsys.readouterr()
    assert "REDIS_URL" in err and "percent-encoded" in err
    assert "s3c" not in out + err


# ---------------------------------------------------------------- deleted documents


def put(store: DocumentStore, doc_id: str, revision: int) -> str:
    [outcome] = store.upsert(
        [{"id": doc_id, "text": doc_id}], np.ones((1, 4), np.float32), revision, model="m"
    )
    return outcome


def test_a_delete_is_remembered_within_its_window(fake_redis):
    store = DocumentStore(fake_redis)
    accepted = time.time_ns()
    assert put(store, "gone", accepted) == "indexed"
    assert store.delete("gone")
    # The delete frees the integer id at once; the tombstone stays for the window.
    assert fake_redis.hget(keys.INDEX_INT_IDS, "gone") is None
    assert fake_redis.hexists(keys.INDEX_REVISIONS, "gone")
    assert fake_redis.zscore(keys.INDEX_TOMBSTONES, "gone") is not None
    assert put(store, "other", time.time_ns()) == "indexed"
    assert fake_redis.hexists(keys.INDEX_REVISIONS, "gone")
    # A write accepted before the delete, arriving after it, cannot bring it back.
    assert put(store, "gone", accepted) == "superseded"
    assert store.get("gone") is None


def test_deleted_ids_are_forgotten_after_the_window_and_stale_writes_still_lose(fake_redis):
    store = DocumentStore(fake_redis, tombstone_seconds=0.05)
    accepted = time.time_ns()
    for doc_id in ("a", "b", "c"):
        assert put(store, doc_id, accepted) == "indexed"
    for doc_id in ("a", "b"):
        assert store.delete(doc_id)
    time.sleep(0.1)
    # The next write forgets the old tombstones: nothing of "a" or "b" is left.
    assert put(store, "c", time.time_ns()) == "indexed"
    for doc_id in ("a", "b"):
        assert not fake_redis.hexists(keys.INDEX_REVISIONS, doc_id)
        assert not fake_redis.hexists(keys.INDEX_INT_IDS, doc_id)
    assert fake_redis.zcard(keys.INDEX_TOMBSTONES) == 0
    assert fake_redis.hlen(keys.INDEX_REVISIONS) == 1
    # A write accepted before the forgotten deletes still cannot bring a document back...
    assert put(store, "a", accepted) == "superseded"
    assert store.get("a") is None
    # ...and a request accepted after them writes as usual.
    assert put(store, "a", time.time_ns()) == "indexed"
    assert store.get("a").text == "a"


def test_deletes_alone_forget_old_tombstones_too(fake_redis):
    store = DocumentStore(fake_redis, tombstone_seconds=0.05)
    for doc_id in ("a", "b"):
        put(store, doc_id, time.time_ns())
    store.delete("a")
    time.sleep(0.1)
    store.delete("b")
    assert not fake_redis.hexists(keys.INDEX_REVISIONS, "a")
    assert fake_redis.hexists(keys.INDEX_REVISIONS, "b")
    assert [m.decode() for m in fake_redis.zrange(keys.INDEX_TOMBSTONES, 0, -1)] == ["b"]


def test_writing_a_deleted_id_again_clears_its_tombstone(fake_redis):
    store = DocumentStore(fake_redis)
    put(store, "a", time.time_ns())
    store.delete("a")
    assert put(store, "a", time.time_ns()) == "indexed"
    assert fake_redis.zcard(keys.INDEX_TOMBSTONES) == 0
    assert fake_redis.hget(keys.INDEX_INT_IDS, "a") is not None


# ---------------------------------------------------------------- duplicate keys


@pytest.mark.parametrize(
    ("path", "raw", "key"),
    [
        ("/jobs/log", '{"message": "a", "message": "b"}', "message"),
        ("/jobs/log", '{"message": "a", "queue": "low", "queue": "high"}', "queue"),
        ("/jobs/embed", '{"text": "x", "metadata": {"lang": "en", "lang": "fr"}}', "lang"),
        ("/jobs/embed", '{"documents": [{"id": "a", "text": "x", "text": "y"}]}', "text"),
        ("/search", '{"query": "q", "k": 1, "k": 50}', "k"),
        ("/search", '{"query": "q", "filter": {"topic": "a", "topic": "b"}}', "topic"),
    ],
)
def test_a_duplicate_key_is_refused_naming_it(client, fake_redis, path, raw, key):
    error = assert_error(post_raw(client, path, raw), 400, "invalid_json")
    assert repr(key) in error["message"]
    assert error["details"] == {"duplicate_key": key}
    assert not fake_redis.keys("rq:*")


@pytest.mark.parametrize(
    ("path", "name"),
    [("/jobs/{id}?wait=0&wait=60", "wait"), ("/jobs?limit=1&limit=200", "limit"), ("/search?q=a&q=b", "q")],
)
def test_a_repeated_query_parameter_is_refused_naming_it(client, path, name):
    job = client.post("/jobs/sleep", json={"seconds": 1}).get_json()
    error = assert_error(client.get(path.format(id=job["id"])), 422, "validation_failed")
    assert [detail["field"] for detail in error["details"]] == [name]
