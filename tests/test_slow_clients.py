"""The web tier against slow and malformed clients: webserver/worker.py under the Procfile's gunicorn.

Hundreds of connections that send half a request and go quiet, or drip it a byte every few
seconds, must not keep anyone else from being answered: a request reaches a thread only once
whole, one too large is refused at once, one not whole after `REQUEST_TIMEOUT` gets a 408.
What only the HTTP server sees (a header too large, a control byte, an over-long path,
Content-Length with Transfer-Encoding) is answered in the API's JSON error shape, never an
HTML page. The dripping attacks hold new clients to p99 < 250 ms (P99_BOUND), the one
latency bound asserted here; bench.slow_clients measures the rest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import suppress
from pathlib import Path

import flask_swagger_ui
import pytest
import requests
from gunicorn.config import Config
from gunicorn.errors import ConfigError
from gunicorn.workers.gthread import TConn

from bench.slow_clients import (
    ATTACKS,
    DRIP_EVERY,
    Attacker,
    dripping_phase,
    open_attackers,
    outcomes,
    p99,
)
from scripts.embedded_redis import free_port
from tests.support import DEADLINE, Process, WebService, procfile_command, wait_until
from webserver import worker
from webserver.worker import BufferingWorker, Refused, RequestFraming, ResponseDeadline

STALLED = 400
PROBES = 100
PROBE_TIMEOUT = 5  # generous: a probe that waits for a thread behind the stalled sockets waits forever
DRIPPERS = 80  # connections per dripping attack: more than the web process's 2 x 16 threads
CODES = {408: "request_timeout", 413: "payload_too_large", 431: "headers_too_large"}
P99_BOUND = 0.25  # seconds: the latency bound new clients must get while the attacks go on
TLS_WINDOW = 10  # seconds the TLS attackers drip while probes run (less than REQUEST_TIMEOUT)


# ---------------------------------------------------------------- when a request is whole

MAX_BODY = 1024 * 1024


def whole(data: bytes, max_body: int = MAX_BODY) -> bool:
    """What RequestFraming says of `data`, given at once and given a byte at a time (it must agree)."""
    at_once = RequestFraming(max_body).whole(bytearray(data))
    framing, received = RequestFraming(max_body), bytearray()
    for byte in data:
        received.append(byte)
        in_pieces = framing.whole(received)
    assert in_pieces == at_once
    return at_once


def refusal(data: bytes, max_body: int = MAX_BODY) -> tuple[int, str]:
    with pytest.raises(Refused) as refused:
        RequestFraming(max_body).whole(bytearray(data))
    status_line, _, body = refused.value.response.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(body.partition(b"\r\n\r\n")[2])["error"]["code"]


CHUNKED = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc", False),
        (b"POST / HTTP/1.1\r\ncontent-length : 5\r\n\r\nabcde", True),
        (CHUNKED + b"3\r\nabc\r\n", False),
        (CHUNKED + b"3;x=y\r\nabc\r\n0\r\n\r\n", True),
        (CHUNKED + b"0\r\nX-Trailer: 1\r\n", False),
        (CHUNKED + b"0\r\nX-Trailer: 1\r\n\r\n", True),
        # Framing the parser refuses goes to it at the head's end, to be answered 400 or 501.
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", True),
    ],
)
def test_a_request_is_handed_to_a_thread_once_whole(data, expected):
    assert whole(data) is expected


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * worker.HEAD_BUFFER_BYTES, 431, "headers_too_large"),
        (b"GET / HTTP/1.1\nHost: x\n\n", 400, "bad_request"),  # bare LF
        (b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413, "payload_too_large"),
        (CHUNKED + b"80000\r\n" + b"a" * 0x80000 + b"\r\n80001\r\n", 413, "payload_too_large"),
        (CHUNKED + b"1;" + b"x" * 2000 + b"\r\na\r\n", 400, "bad_request"),  # an over-long chunk line
        (CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n", 400, "bad_request"),
        (CHUNKED + b"0x2\r\n{}\r\n0\r\n\r\n", 400, "bad_request"),  # int(..., 16) would take it
        (CHUNKED + b"2\r\n{}XX0\r\n\r\n", 400, "bad_request"),
        (CHUNKED + b"0\r\nX-Big: " + b"a" * worker.HEAD_BUFFER_BYTES, 431, "headers_too_large"),
    ],
)
def test_what_cannot_be_served_is_refused_before_a_thread_sees_it(data, status, code):
    assert refusal(data) == (status, code)


def test_the_limits_follow_max_body_bytes():
    assert whole(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n" + b"a" * 10, max_body=10)
    assert refusal(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", max_body=10)[0] == 413
    assert whole(CHUNKED + b"a\r\n" + b"a" * 10 + b"\r\n0\r\n\r\n", max_body=10)
    assert refusal(CHUNKED + b"a\r\n" + b"a" * 10 + b"\r\n1\r\n", max_body=10)[0] == 413


def test_chunk_framing_may_not_outgrow_the_body():
    """A body in one-byte chunks with long extensions would buffer far more than MAX_BODY_BYTES."""
    chunk = b"1;" + b"x" * 1000 + b"\r\na\r\n"
    assert refusal(CHUNKED + chunk * (2 * 1024 * 64 // len(chunk) + 1), max_body=64 * 1024)[0] == 413


def test_expect_100_continue_is_noticed_when_a_body_is_still_to_come():
    framing = RequestFraming(MAX_BODY)
    assert not framing.whole(
        bytearray(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    )
    assert framing.expects_continue
    framing = RequestFraming(MAX_BODY)
    assert framing.whole(bytearray(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"))
    assert not framing.expects_continue


# ---------------------------------------------------------------- the worker's event loop, in this process


class _Threads:
    """Stands in for the worker's thread pool: records the connections it is given."""

    def __init__(self) -> None:
        self.given: list = []

    def submit(self, function, conn) -> Future:
        self.given.append(conn)
        return Future()  # never done: the request stays with its "thread"


@pytest.fixture
def loop_worker() -> Iterator[BufferingWorker]:
    """A BufferingWorker whose event loop the test turns, with real sockets and no threads."""
    loop = BufferingWorker(0, os.getpid(), [], None, 30, Config(), logging.getLogger("test"))
    loop.poller = selectors.DefaultSelector()
    loop.tpool = _Threads()
    yield loop
    for conn in [*loop.reading, *loop.lingering, *loop.tpool.given]:
        conn.sock.close()
    loop.poller.close()
    loop.tmp.close()


def connect(loop: BufferingWorker, data: bytes) -> socket.socket:
    """A client connection to `loop` that has sent `data`; the loop reads it."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    theirs.sendall(data)
    loop.nr_conns += 1
    loop.enqueue_req(TConn(loop.cfg, ours, ("127.0.0.1", 0), ("127.0.0.1", 0)))
    loop.wait_for_and_dispatch_events(timeout=0.1)
    return theirs


def test_past_the_budget_the_largest_unfinished_request_is_refused_and_none_goes_to_a_thread(loop_worker):
    loop_worker.budget = 250_000
    head = b"POST /jobs/log HTTP/1.1\r\nContent-Length: 500000\r\n\r\n"
    first = connect(loop_worker, head + b"a" * 100_000)
    largest = connect(loop_worker, head + b"a" * 120_000)
    small = connect(loop_worker, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # whole: to a thread
    assert len(loop_worker.tpool.given) == 1
    assert loop_worker.buffered_bytes > 200_000

    last = connect(loop_worker, head + b"a" * 50_000)  # past the budget
    assert loop_worker.buffered_bytes <= loop_worker.budget
    assert len(loop_worker.reading) == 2  # the first and the last still arriving
    status, headers, body = _read_answer(largest)
    assert status == 503
    assert headers["retry-after"] == str(worker.BUSY_RETRY_AFTER)
    assert json.loads(body)["error"]["code"] == "unavailable"
    assert len(loop_worker.tpool.given) == 1  # nothing unfinished went to a thread
    for sock in (first, largest, small, last):
        sock.close()


# ---------------------------------------------------------------- writing a response


def test_a_client_that_keeps_reading_slowly_is_cut_off_at_the_response_deadline():
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def read_slowly() -> None:  # always some progress: no single write waits long
        while not stop.is_set():
            with suppress(OSError):
                theirs.recv(65536)
            time.sleep(0.01)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    out = ResponseDeadline(ours, timeout=0.5, per_write=0.4)
    sent = 0
    try:
        with pytest.raises(TimeoutError):
            for _ in range(1000):  # 64 MB: far more than the reader takes in 0.5 s
                out.sendall(b"a" * 65536)
                sent += 65536
    finally:
        stop.set()
        reader.join()
        ours.close()
        theirs.close()
    assert sent >= 4 * 65536  # writes went through until the deadline ended the response


def test_a_client_that_reads_nothing_fails_the_write_after_the_per_write_bound():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        out = ResponseDeadline(ours, timeout=60, per_write=0.2)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            out.sendall(b"a" * 10_000_000)
        assert time.monotonic() - started < 30  # the per-write bound, far before the deadline


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


@pytest.mark.integration
def test_clients_that_drip_hold_no_thread_and_are_refused_or_dropped(own_web):
    """80 connections of each attack in bench.slow_clients.ATTACKS at once, each dripping a byte
    or a header line every 4 s after its first burst: a head over 64 KiB and bodies over
    MAX_BODY_BYTES are refused (431, 413), a request that asks to close the connection is
    answered, and each connection is closed before its next drip; a small body that never ends
    is answered 408 at REQUEST_TIMEOUT. Meanwhile new clients are answered: p99 under 250 ms
    for /healthz and for POST /jobs/log, each on a new connection.
    """
    attackers = open_attackers(own_web.port, DRIPPERS)
    opened = min(attacker.opened for attacker in attackers)
    # Probes for as long as the small bodies are still dripping (over 10 s: two drips or more),
    # then their 408s are awaited.
    until = (opened + worker.REQUEST_TIMEOUT - 1, opened + worker.REQUEST_TIMEOUT + 10)
    latencies = dripping_phase(own_web.base, attackers, *until)
    figures = {
        kind: f"p99 {p99(samples) * 1000:.0f} ms of {len(samples)}" for kind, samples in latencies.items()
    }
    print(f"\nprobes while {len(attackers)} connections dripped: {figures}")
    for attack, outcome in outcomes(attackers).items():
        print(f"  {attack}: {outcome}")

    for kind, samples in latencies.items():
        assert p99(samples) < P99_BOUND, f"{kind} probes: {figures[kind]}"
    for attacker in attackers:
        what = f"{attacker.attack}: {bytes(attacker.answer[:300])!r}"
        assert attacker.status() == attacker.expected, what
        assert attacker.header("content-type") == "application/json", what
        assert attacker.header("connection") == "close", what
        if attacker.expected >= 400:
            assert json.loads(attacker.body())["error"]["code"] == CODES[attacker.expected], what
        assert attacker.closed is not None, f"{attacker.attack}: still open"
        if attacker.expected == 408:
            assert attacker.closed - attacker.opened > worker.REQUEST_TIMEOUT - 1, (
                f"{what}: before the deadline"
            )
        else:  # answered and closed at once: nothing of the rest was waited for
            assert attacker.closed - (attacker.burst_sent or attacker.opened) < DRIP_EVERY, f"{what}: late"
    assert {a.attack for a in attackers} == set(ATTACKS)


# ---------------------------------------------------------------- TLS served by gunicorn itself


@pytest.fixture
def tls_web(env, tmp_path) -> Iterator[tuple[str, int, Path]]:
    """The Procfile's web process serving TLS itself (certfile set): its URL, port and certificate."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    settings = dict(env, WEB_CONCURRENCY="2", HOST="127.0.0.1", PORT=str(port))
    settings["GUNICORN_CMD_ARGS"] = f"--certfile {cert} --keyfile {key}"
    process = Process("web-tls", procfile_command("web"), settings, tmp_path / "web-tls.log")
    base = f"https://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: requests.get(base + "/healthz", verify=str(cert), timeout=5).status_code == 200,
            what="the TLS web process",
            process=process,
        )
        yield base, port, cert
    finally:
        process.kill()


def _client_hello(tls: ssl.SSLContext) -> bytes:
    """The first flight of a TLS handshake, as this client sends it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with suppress(ssl.SSLWantReadError):
        tls.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1").do_handshake()
    return outgoing.read()


@pytest.mark.integration
def test_with_tls_served_by_gunicorn_handshakes_and_requests_are_read_on_the_event_loop(tls_web):
    """The same attacks over TLS, and handshakes dripped a byte every 4 s: no thread is held."""
    base, port, cert = tls_web
    tls = ssl.create_default_context(cafile=str(cert))
    hello = _client_hello(tls)
    handshake = (None, hello[:10], lambda n: hello[10 + n : 11 + n])
    attackers = open_attackers(port, DRIPPERS, tls)
    attackers += [Attacker("TLS handshake, dripped", port, how=handshake) for _ in range(DRIPPERS)]
    opened = min(attacker.opened for attacker in attackers)
    # Probes while the attackers drip (2 drips: plenty to hold threads that read per call).
    latencies = dripping_phase(base, attackers, opened + TLS_WINDOW, opened + TLS_WINDOW + 1, str(cert))
    figures = {kind: f"p99 {p99(got) * 1000:.0f} ms of {len(got)}" for kind, got in latencies.items()}
    print(f"\nprobes over TLS while {len(attackers)} TLS connections dripped: {figures}")
    for kind, samples in latencies.items():
        assert p99(samples) < P99_BOUND, f"{kind} probes: {figures[kind]}"
    for attacker in attackers:
        what = f"{attacker.attack}: {bytes(attacker.answer[:300])!r}"
        if attacker.expected in (None, 408):  # still arriving when the window ended, and still waited for
            assert attacker.closed is None and not attacker.answer, what
        else:
            assert attacker.status() == attacker.expected, what
            assert attacker.closed is not None and attacker.closed - attacker.burst_sent < DRIP_EVERY, what


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
def test_expect_100_continue_is_answered_while_the_body_is_awaited(web):
    body = b'{"message": "after 100 Continue"}'
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as sock:
        sock.sendall(
            b"POST /jobs/log HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        status, _, answer = _read_answer(sock)
    assert status == 202, answer  # one 100 Continue only: the final answer comes next


@pytest.mark.integration
def test_pipelined_requests_on_one_connection_are_answered_in_order(web):
    body = b'{"message": "pipelined"}'
    post = (
        b"POST /jobs/log HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as sock:
        sock.sendall(post + post + last)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses == [202, 202, 200]


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
def test_a_large_static_file_arrives_whole(web):
    """Files (Swagger UI's bundle) are written in blocks under the response deadline, not sendfile."""
    response = requests.get(web.url("/docs/swagger-ui-bundle.js"), timeout=30)
    assert response.status_code == 200
    bundle = Path(flask_swagger_ui.__file__).parent / "dist" / "swagger-ui-bundle.js"
    assert response.content == bundle.read_bytes()


def test_the_worker_refuses_to_start_with_a_protocol_it_does_not_frame():
    config = Config()
    config.set("proxy_protocol", "v1")
    with pytest.raises(ConfigError):
        BufferingWorker.check_config(config, logging.getLogger("test"))
    BufferingWorker.check_config(Config(), logging.getLogger("test"))  # the defaults are fine


@pytest.mark.integration
def test_the_web_process_runs_the_buffering_worker(web):
    wait_until(lambda: "BufferingWorker" in web.process.output(), what="the worker class in the log")
