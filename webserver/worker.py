"""The web process's gunicorn worker: a thread takes a request only once it has all arrived.

gunicorn's threaded worker (gthread) hands a connection to a thread as soon as it sends a
byte, and the thread then reads the rest of the request from the client: a few dozen clients
that send slowly hold every thread, and nothing else is answered. This worker is gthread
with the reading moved to the worker's event loop, where a slow client costs its buffer and
no thread:

- Each request, head and body (and, when gunicorn serves TLS itself, the handshake), is read
  on the event loop. A thread takes a request only once it has all arrived, and parses it
  from those bytes, never from the socket, so it never waits for a client to send.
- One deadline for the whole request: REQUEST_TIMEOUT s from the connection (kept alive:
  from the next request's first byte); a request not whole by then is answered 408.
- A head over HEAD_BUFFER_BYTES is refused there (431), a body over the app's
  MAX_BODY_BYTES as soon as its Content-Length or its chunks say so (413), a malformed
  chunked body at its first bad byte (400); the connection is then closed at once.
- Past BUFFER_BUDGET bytes of unfinished requests in a process, the largest are refused
  (503, Retry-After) until the rest fit: memory stays bounded, nothing unfinished goes to a
  thread, and small requests (health checks) still get through.
- A connection is closed as RFC 9112 section 9.6 asks (FIN, then what the client still sends
  is read and dropped for up to LINGER s, so it gets the answer rather than a reset), on the
  event loop too: gthread does that in a blocking read on its event loop, which a client
  that never closes stalls for 2 s each time.

Responses are still written by the thread, which waits on a client that reads slowly only
once the kernel's send buffer is full: each write on the socket fails after REQUEST_TIMEOUT
s, as before, and a whole response must be taken within RESPONSE_TIMEOUT s of its first
byte; then the connection is closed.

The errors only the server sees (a header too large, a control byte in a header, an
over-long request line, Content-Length with Transfer-Encoding) are answered in the API's
JSON error shape instead of gunicorn's HTML page. gunicorn has no hook for that page, so
`write_error` replaces `gunicorn.util.write_error`, the one function that writes it;
tests/test_slow_clients.py checks each such answer, so a gunicorn release that writes its
pages elsewhere fails there.
"""

from __future__ import annotations

import json
import re
import selectors
import socket
import ssl
import struct
import time
from contextlib import suppress
from functools import partial

from gunicorn import sock as gunicorn_sock
from gunicorn import util
from gunicorn.errors import ConfigError
from gunicorn.http import get_parser
from gunicorn.workers.gthread import ThreadWorker

from jobs.settings import get_settings

# Seconds a client has to deliver a whole request (head and body) before it is answered 408.
REQUEST_TIMEOUT = 15
# Largest request head (request line and headers, up to the empty line): past it, 431.
HEAD_BUFFER_BYTES = 64 * 1024
# Longest chunk-size line of a chunked body (size and extensions): past it, 400.
CHUNK_LINE_BYTES = 1024
# Seconds a stopping process still gives requests on their way (gthread gives kept-alive
# connections as long), so stalled clients cannot hold up a graceful shutdown.
STOP_GRACE = 2
# Most bytes one process buffers for unfinished requests (at least four of the largest);
# past it, the largest unfinished requests are refused with 503 until the rest fit.
BUFFER_BUDGET = 64 * 1024 * 1024
# Seconds a client has to take a whole response from its first byte (each write on its
# socket: REQUEST_TIMEOUT s); then it is closed.
RESPONSE_TIMEOUT = 30
# Seconds, and bytes, a closing connection is read from (and the bytes dropped) after its
# FIN, so the client reads the answer before the close; then it is closed.
LINGER = 2
LINGER_BYTES = 256 * 1024
# Seconds a client refused for the budget is asked to wait before it tries again.
BUSY_RETRY_AFTER = 1
_RECV_BYTES = 256 * 1024

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([^\r]*)")
_TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding[ \t]*:[ \t]*([^\r]*)")
_EXPECT_CONTINUE = re.compile(rb"\r\nexpect[ \t]*:[ \t]*100-continue[ \t]*\r")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")
_CODES = {
    400: "bad_request",
    403: "forbidden",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
}


def error_response(status: int, reason: str, message: str = "", headers: str = "") -> bytes:
    """A short JSON answer in the API's error shape, closing the connection."""
    text = f"{reason}: {message}" if message else reason
    body = json.dumps({"error": {"code": _CODES.get(status, "error"), "message": text[:300]}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"{headers}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def write_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's error page, as JSON (replaces `gunicorn.util.write_error`)."""
    util.write_nonblock(sock, error_response(status_int, reason, mesg))


util.write_error = write_error

_TIMED_OUT = error_response(408, "Request Timeout", f"no whole request within {REQUEST_TIMEOUT} s")
_BUSY = error_response(
    503, "Service Unavailable", "too many requests arriving at once", f"Retry-After: {BUSY_RETRY_AFTER}\r\n"
)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def request_limit(max_body: int) -> int:
    """Most bytes one request may take: a head, a body with chunk framing as large again, trailers."""
    return 2 * HEAD_BUFFER_BYTES + 2 * max_body


class Refused(Exception):
    """A request refused before it reached a thread; `response` is the answer."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.response = error_response(status, reason, message)


class RequestFraming:
    """Where the request at the start of a connection's bytes ends, worked out as they arrive.

    `whole(data)` says whether `data` holds a whole request, or raises Refused. It reads only
    what it must to find the end (the head, then a body's length or its chunk sizes), each
    byte once, and leaves everything else about the request to gunicorn's parser: framing the
    parser refuses anyway (Content-Length with Transfer-Encoding, two lengths, an unknown
    coding) counts as whole at the head's end, so the parser answers it at once.
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.head_end = -1  # offset just past the empty line that ends the head
        self.scanned = 0  # how much of the head has been searched
        self.body_end = -1  # with a Content-Length: where the body ends
        self.chunk_at = -1  # chunked: offset of the next chunk-size line
        self.trailers_at = -1  # chunked, after the last chunk: offset of the trailers
        self.decoded = 0  # chunked: body bytes in the chunks read so far
        self.expects_continue = False

    def whole(self, data: bytearray) -> bool:
        if self.head_end < 0 and not self._head(data):
            return False
        if self.body_end >= 0:
            return len(data) >= self.body_end
        if self.chunk_at >= 0:
            return self._chunks(data)
        return True

    def _head(self, data: bytearray) -> bool:
        end = data.find(b"\r\n\r\n", max(self.scanned - 3, 0), HEAD_BUFFER_BYTES)
        if _BARE_LF.search(data, self.scanned, end + 4 if end >= 0 else HEAD_BUFFER_BYTES):
            raise Refused(400, "Bad Request", "a line of the request head ends in a bare LF, not CRLF")
        if end < 0:
            if len(data) >= HEAD_BUFFER_BYTES:
                raise _too_large_head("the request head")
            self.scanned = len(data)
            return False
        self.head_end = end + 4
        head = bytes(data[:end]).lower()
        lengths = _CONTENT_LENGTH.findall(head)
        codings = _TRANSFER_ENCODING.findall(head)
        if codings:
            if lengths or len(codings) > 1 or codings[0].rsplit(b",", 1)[-1].strip(b" \t") != b"chunked":
                return True  # for the parser to refuse
            self.chunk_at = self.head_end
        elif lengths:
            value = lengths[0].strip(b" \t")
            if len(lengths) > 1 or not value.isdigit():
                return True  # for the parser to refuse
            if int(value) > self.max_body:
                raise _too_large(self.max_body)
            self.body_end = self.head_end + int(value)
        self.expects_continue = (self.chunk_at >= 0 or self.body_end > self.head_end) and bool(
            _EXPECT_CONTINUE.search(head + b"\r")
        )
        return True

    def _chunks(self, data: bytearray) -> bool:
        position = self.chunk_at
        while self.trailers_at < 0:
            line_end = data.find(b"\r\n", position, position + CHUNK_LINE_BYTES)
            if line_end < 0:
                if len(data) - position >= CHUNK_LINE_BYTES:
                    raise _malformed(f"a chunk-size line is over {CHUNK_LINE_BYTES} bytes")
                break
            size = bytes(data[position:line_end]).split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size):
                raise _malformed(f"the chunk size {size[:20]!r} is not hexadecimal")
            size = int(size, 16)
            if self.decoded + size > self.max_body:
                raise _too_large(self.max_body)
            if size == 0:
                self.trailers_at = line_end + 2
                break
            data_end = line_end + 2 + size
            if data_end - self.head_end > request_limit(self.max_body) - 2 * HEAD_BUFFER_BYTES:
                raise Refused(413, "Payload Too Large", "the chunked body's framing is larger than its data")
            if len(data) < data_end + 2:
                break
            if data[data_end : data_end + 2] != b"\r\n":
                raise _malformed("a chunk does not end with CRLF")
            self.decoded += size
            position = data_end + 2
        self.chunk_at = position
        if self.trailers_at < 0 or len(data) - self.trailers_at < 2:
            return False
        if data[self.trailers_at : self.trailers_at + 2] == b"\r\n":
            return True
        if data.find(b"\r\n\r\n", self.trailers_at, self.trailers_at + HEAD_BUFFER_BYTES) >= 0:
            return True
        if len(data) - self.trailers_at >= HEAD_BUFFER_BYTES:
            raise _too_large_head("the trailers")
        return False


def _too_large(max_body: int) -> Refused:
    return Refused(413, "Payload Too Large", f"Request body is larger than the limit of {max_body} bytes.")


def _too_large_head(what: str) -> Refused:
    return Refused(431, "Request Header Fields Too Large", f"{what} is over {HEAD_BUFFER_BYTES} bytes")


def _malformed(why: str) -> Refused:
    return Refused(400, "Bad Request", f"the chunked body is malformed: {why}")


def _bound_socket_waits(sock: socket.socket) -> None:
    """Make each blocking read or write on `sock` fail after REQUEST_TIMEOUT s instead of waiting on."""
    timeval = struct.pack("ll", REQUEST_TIMEOUT, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class ResponseDeadline:
    """A thread's socket while it writes a response: all of it must be sent within `timeout` s.

    The deadline starts with the first byte. Each write may take at most `per_write` s, as
    before (SO_SNDTIMEO), and no longer than what is left of the deadline; past it, a write
    fails like a timed-out one and the connection is closed. So a client that reads a byte
    now and then keeps a thread `timeout` s at most, not for as long as it keeps reading.
    """

    def __init__(self, sock: socket.socket, timeout: float, per_write: float = REQUEST_TIMEOUT) -> None:
        self._sock = sock
        self._timeout = timeout
        self._per_write = per_write
        self._deadline: float | None = None

    def _remaining(self) -> float:
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._timeout
        if now >= self._deadline:
            raise TimeoutError(f"the client took more than {self._timeout} s to take the response")
        return self._deadline - now

    def sendall(self, data: bytes) -> None:
        # A socket timeout bounds a whole sendall call, however it progresses.
        self._sock.settimeout(min(self._remaining(), self._per_write))
        try:
            self._sock.sendall(data)
        finally:
            self._sock.settimeout(None)

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    def sendfile(self, file, offset: int = 0, count: int | None = None) -> int:
        file.seek(offset)
        sent = 0
        while count is None or sent < count:
            block = file.read(65536 if count is None else min(65536, count - sent))
            if not block:
                break
            self.sendall(block)
            sent += len(block)
        return sent

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class BufferingWorker(ThreadWorker):
    """gthread, with each request read whole on the event loop before a thread takes it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Connections sending a request, and connections closing, oldest deadline first.
        self.reading: dict = {}
        self.lingering: dict = {}
        self.buffered_bytes = 0
        self.stopping = False
        self.max_body = get_settings().max_body_bytes
        self.budget = max(BUFFER_BUDGET, 4 * request_limit(self.max_body))
        self.tls: ssl.SSLContext | None = None

    @classmethod
    def check_config(cls, cfg, log) -> None:
        super().check_config(cfg, log)
        # The framing read on the event loop is HTTP/1.1's, one request at a time.
        protocols = getattr(cfg, "http_protocols", ["h1"])
        if "h2" in protocols or getattr(cfg, "protocol", "http") != "http" or cfg.proxy_protocol != "off":
            raise ConfigError("BufferingWorker serves HTTP/1.1 only: no h2, uwsgi or proxy protocol")

    def init_process(self) -> None:
        if self.cfg.is_ssl:
            self.tls = gunicorn_sock.ssl_context(self.cfg)  # once, not per connection
        super().init_process()

    # ------------------------------------------------------------ reading a request

    def enqueue_req(self, conn) -> None:
        """A connection with a request on its way (new, kept alive, or with bytes read ahead)."""
        if not hasattr(conn, "framing"):
            _bound_socket_waits(conn.sock)
            conn.handshaking = False
            if self.tls is not None:
                try:
                    conn.sock = self.tls.wrap_socket(
                        conn.sock,
                        server_side=True,
                        do_handshake_on_connect=False,
                        suppress_ragged_eofs=self.cfg.suppress_ragged_eofs,
                    )
                except OSError:  # the client is gone already
                    self._close(conn)
                    return
                conn.handshaking = True
        # Bytes a previous request's parse read ahead are the start of this one.
        conn.received = bytearray(conn.parser.unreader.take_buffered() if conn.parser else b"")
        conn.framing = RequestFraming(self.max_body)
        conn.continued = False
        conn.events = selectors.EVENT_READ
        conn.deadline = time.monotonic() + (STOP_GRACE if self.stopping else REQUEST_TIMEOUT)
        conn.sock.setblocking(False)
        self.buffered_bytes += len(conn.received)
        self.reading[conn] = None
        self.poller.register(conn.sock, conn.events, partial(self._on_readable, conn))
        self._advance(conn)  # what has arrived already, without a trip through the poller

    def _on_readable(self, conn, _sock) -> None:
        self._advance(conn)

    def _advance(self, conn) -> None:
        try:
            if conn.handshaking and not self._handshake(conn):
                return
            gone = self._receive(conn)
            whole = conn.framing.whole(conn.received)
        except Refused as refusal:
            self._stop_reading(conn)
            self._refuse(conn, refusal.response)
            return
        except OSError:  # the connection broke, or the TLS handshake failed
            self._stop_reading(conn)
            self._close(conn)
            return
        except Exception:  # a fault here must cost this connection, not the process's event loop
            self.log.exception("reading a request from %s failed", conn.client)
            self._stop_reading(conn)
            self._close(conn)
            return
        if not whole and len(conn.received) > request_limit(self.max_body):  # no more is read
            self._stop_reading(conn)
            self._refuse(conn, _too_large(self.max_body).response)
            return
        if whole or gone:
            self._stop_reading(conn)
            # A client that closed its side after a whole head still gets an answer (the app
            # answers a cut-off body with a JSON 400); one that sent less gets none.
            if whole or conn.framing.head_end >= 0:
                self._hand_over(conn)
            else:
                self._close(conn)
            return
        if conn.framing.expects_continue and not conn.continued:
            conn.continued = True
            with suppress(OSError):
                conn.sock.send(_CONTINUE)
        if self.buffered_bytes > self.budget:
            self._shed()

    def _handshake(self, conn) -> bool:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return False
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return False
        conn.handshaking = False
        self._watch(conn, selectors.EVENT_READ)
        return True

    def _watch(self, conn, events: int) -> None:
        if events != conn.events:
            conn.events = events
            self.poller.modify(conn.sock, events, partial(self._on_readable, conn))

    def _receive(self, conn) -> bool:
        """Read what the client sent (a TLS socket until its buffer is empty); True if it closed its side."""
        before = len(conn.received)
        gone = False
        try:
            while len(conn.received) <= request_limit(self.max_body):
                data = conn.sock.recv(_RECV_BYTES)
                if not data:
                    gone = True
                    break
                conn.received += data
                if len(data) < _RECV_BYTES and self.tls is None:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:  # TLS wants to write before it reads on
            self._watch(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
        finally:
            self.buffered_bytes += len(conn.received) - before
        return gone

    def _stop_reading(self, conn) -> None:
        self.poller.unregister(conn.sock)
        del self.reading[conn]
        self.buffered_bytes -= len(conn.received)

    def _shed(self) -> None:
        """Past the budget: refuse the largest unfinished requests until the rest fit."""
        while self.buffered_bytes > self.budget:
            largest = max(self.reading, key=lambda conn: len(conn.received))
            self._stop_reading(largest)
            self._refuse(largest, _BUSY)

    def _hand_over(self, conn) -> None:
        conn.prefetched, conn.received = bytes(conn.received), bytearray()
        super().enqueue_req(conn)

    # ------------------------------------------------------------ in a thread

    def handle(self, conn):
        # The parser reads the request from the bytes that arrived, never from the socket.
        conn.parser = get_parser(self.cfg, [conn.prefetched], conn.client)
        conn.prefetched = b""
        conn.data_ready = True  # gthread need not wait for a first byte: the request is here
        return super().handle(conn)

    def handle_request(self, req, conn):
        # The body is here already: a "100 Continue" now would be late (and the event loop
        # sent one while it was arriving).
        req._expected_100_continue = False
        sock = conn.sock
        conn.sock = ResponseDeadline(sock, RESPONSE_TIMEOUT)
        try:
            return super().handle_request(req, conn)
        except TimeoutError as error:  # a client that does not read: closed, no traceback logged
            self.log.info("closing the connection of %s: %s", conn.client, error)
            return False
        finally:
            conn.sock = sock

    # ------------------------------------------------------------ closing

    def finish_request(self, conn, fs) -> None:
        if not fs.cancelled() and fs.exception() is None and not fs.result():
            # gthread would close it gracefully with a blocking read on this loop.
            self._linger(conn)
            return
        super().finish_request(conn, fs)

    def _refuse(self, conn, response: bytes) -> None:
        """Answer a request that will not reach a thread, and close its connection."""
        conn.received = bytearray()
        if conn.handshaking:  # no TLS session to answer in
            self._close(conn)
            return
        with suppress(OSError):
            conn.sock.send(response)
        self._linger(conn)

    def _linger(self, conn) -> None:
        """FIN, then read and drop what the client still sends until it closes, or LINGER s."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)  # on a TLS socket: the raw socket's, no close_notify
            conn.sock.setblocking(False)
        except OSError:
            self._close(conn)
            return
        conn.linger_until = time.monotonic() + LINGER
        conn.drained = 0
        self.lingering[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_lingering, conn))

    def _on_lingering(self, conn, _sock) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if not data or conn.drained > LINGER_BYTES:
            self._end_linger(conn)

    def _end_linger(self, conn) -> None:
        self.poller.unregister(conn.sock)
        del self.lingering[conn]
        self._close(conn)

    def _close(self, conn) -> None:
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        if not self.alive and not self.stopping:
            self.stopping = True
            for conn in self.reading:  # same order kept: every deadline capped alike
                conn.deadline = min(conn.deadline, now + STOP_GRACE)
        while self.reading:
            conn = next(iter(self.reading))
            if conn.deadline > now:
                break
            self._stop_reading(conn)
            self._refuse(conn, _TIMED_OUT)
        while self.lingering:
            conn = next(iter(self.lingering))
            if conn.linger_until > now:
                break
            self._end_linger(conn)
