"""The web tier against slow and malformed clients: webserver/worker.py under the Procfile's gunicorn.

Hundreds of connections that send half a request and go quiet must not keep anyone else
from being answered, and are dropped with a 408 after `REQUEST_TIMEOUT`; what only the HTTP
server sees (a header too large, a control byte, an over-long path, Content-Length with
Transfer-Encoding) is answered in the API's JSON error shape, never an HTML page.
The latency these stalled sockets cost is measured by bench.slow_clients, not asserted here.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.support import DEADLINE, WebService, wait_until
from webserver import worker
from webserver.worker import request_complete

STALLED = 400
PROBES = 100
PROBE_TIMEOUT = 5  # generous: a probe that waits for a thread behind the stalled sockets waits forever


# ---------------------------------------------------------------- when a request is whole


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc", False),
        (b"POST / HTTP/1.1\r\ncontent-length : 5\r\n\r\nabcde", True),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", False),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: 1\r\n", False),
        # Framing the parser refuses goes to it at once, to be answered 400.
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", None),
    ],
)
def test_a_request_is_handed_to_a_thread_once_whole(data, expected):
    assert request_complete(data) is expected


def test_heads_and_bodies_past_the_buffer_go_to_the_parser_unfinished():
    assert request_complete(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * worker.HEAD_BUFFER_BYTES) is None
    big = worker.BUFFERED_BODY_BYTES + 1
    assert request_complete(f"POST / HTTP/1.1\r\nContent-Length: {big}\r\n\r\n".encode()) is None


# ---------------------------------------------------------------- a real web process


def stall(port: int, partial: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(partial)
    return sock


def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data` on a new connection; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.fixture
def own_web(env, tmp_path) -> Iterator[WebService]:
    """A web process of this test's own: the stalled sockets must not slow the shared one."""
    service = WebService(dict(env, WEB_CONCURRENCY="2"), tmp_path)
    yield service
    service.kill()


@pytest.mark.integration
def test_stalled_connections_hold_no_thread_and_are_dropped(own_web):
    port = own_web.port
    stalled = [
        stall(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Stalled: ")  # a head that never ends
        if i % 2
        else stall(
            port,
            b"POST /jobs/log HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"message": ',
        )  # a body that never ends
        for i in range(STALLED)
    ]
    try:
        failures: list[str] = []

        def probe(kind: str) -> None:
            for i in range(PROBES):
                try:
                    if kind == "healthz":
                        response = requests.get(own_web.url("/healthz"), timeout=PROBE_TIMEOUT)
                    else:
                        response = requests.post(
                            own_web.url("/jobs/log"), json={"message": f"probe {i}"}, timeout=PROBE_TIMEOUT
                        )
                    if response.status_code not in (200, 202):
                        failures.append(f"{kind}: {response.status_code} {response.text[:200]}")
                except requests.RequestException as error:
                    failures.append(f"{kind}: {error!r}")

        threads = [threading.Thread(target=probe, args=(kind,)) for kind in ("healthz", "enqueue")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, f"{len(failures)} of {2 * PROBES} probes failed: {failures[:5]}"

        # Each stalled socket is answered 408 in JSON and closed, none kept forever.
        for sock in stalled:
            sock.settimeout(DEADLINE)
        status, headers, body = _read_answer(stalled[0])
        assert status == 408
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "request_timeout"
        for sock in stalled[1:]:
            _read_answer(sock)
    finally:
        for sock in stalled:
            sock.close()


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    assert answer, "closed without an answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.integration
@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            431,
            "headers_too_large",
            id="big header",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n", 400, "bad_request", id="control"
        ),
        pytest.param(
            b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long", id="long path"
        ),
        pytest.param(
            b"POST /jobs/log HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "bad_request",
            id="CL and TE",
        ),
    ],
)
def test_what_only_the_server_sees_is_answered_in_json(web, request_bytes, status, code):
    answered, headers, body = raw_exchange(web.port, request_bytes)
    assert answered == status
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert b"<html" not in body.lower()
    assert json.loads(body)["error"]["code"] == code
    assert len(body) < 400


@pytest.mark.integration
def test_a_request_sent_in_pieces_is_answered(web):
    """Buffering must not change what a slow but honest client gets."""
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as sock:
        body = b'{"message": "sent in pieces"}'
        request = (
            b"POST /jobs/log HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        for i in range(0, len(request), 7):
            sock.sendall(request[i : i + 7])
            time.sleep(0.01)
        status, _, answer = _read_answer(sock)
    assert status == 202, answer
    assert json.loads(answer)["status"] == "queued"


@pytest.mark.integration
def test_stalled_connections_do_not_hold_up_sigterm(own_web):
    """A stopping web process gives unfinished requests STOP_GRACE s, well inside Heroku's 30 s."""
    stalled = [stall(own_web.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Stalled: ") for _ in range(50)]
    try:
        time.sleep(0.5)  # let the server take them in
        stopped_at = time.monotonic()
        own_web.process.signal(signal.SIGTERM)
        own_web.process.popen.wait(timeout=30)
        took = time.monotonic() - stopped_at
        print(f"\nweb exited {took:.1f} s after SIGTERM with 50 stalled connections")
        assert took < worker.REQUEST_TIMEOUT, "stalled connections held up the shutdown"
        assert own_web.process.popen.returncode == 0, own_web.process.output()[-2000:]
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.integration
def test_the_web_process_runs_the_buffering_worker(web):
    wait_until(lambda: "BufferingWorker" in web.process.output(), what="the worker class in the log")
