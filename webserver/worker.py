"""The web process's gunicorn worker: a thread takes a request only once it has all arrived.

gunicorn's threaded worker (gthread) hands a connection to a thread as soon as it sends a
byte, and the thread then waits for the rest of the request: a few dozen clients that send
half a request and go quiet hold every thread, and nothing else is answered. This worker is
gthread with one change: the request's head, and a body of up to `BUFFERED_BODY_BYTES`, are
read on the worker's event loop, where a silent connection costs its buffer and no thread.
A connection whose request is not whole `REQUEST_TIMEOUT` seconds after it connected (or,
kept alive, after its next request's first byte) is answered 408 and closed.

What a thread still reads from a client (a chunked body past the buffer, a body over it, or
a request once `BUFFER_BUDGET` bytes are buffered) and what it writes to one are bounded per
call by the same timeout, at the socket (SO_RCVTIMEO, SO_SNDTIMEO).

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
import struct
import time
from collections import deque
from contextlib import suppress
from functools import partial

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

# Seconds a client has to deliver a whole request (head and body) before it is answered 408.
REQUEST_TIMEOUT = 15
# Request heads larger than this go to a thread unfinished, where gunicorn's own limits
# (limit_request_line, limit_request_fields, limit_request_field_size) refuse them.
HEAD_BUFFER_BYTES = 64 * 1024
# Bodies up to this size are read before a thread is involved: the API's default
# MAX_BODY_BYTES, so any body the API accepts by default arrives whole.
BUFFERED_BODY_BYTES = 1024 * 1024
# Seconds a stopping process still gives requests on their way (gthread gives kept-alive
# connections as long), so stalled clients cannot hold up a graceful shutdown.
STOP_GRACE = 2
# Most bytes one process buffers for unfinished requests; past it, requests go to threads
# as they come (each read still bounded by REQUEST_TIMEOUT), so memory stays bounded.
BUFFER_BUDGET = 64 * 1024 * 1024

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([^\r]*)")
_TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding[ \t]*:")
_CODES = {
    400: "bad_request",
    403: "forbidden",
    408: "request_timeout",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def request_complete(data: bytes) -> bool | None:
    """Whether `data` holds a whole request: True, False (more to come) or None (let the parser judge).

    None hands the bytes to gunicorn's parser as they are: a head too large, framing it will
    refuse (Content-Length with Transfer-Encoding, two lengths) or a body past the buffer.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None if len(data) > HEAD_BUFFER_BYTES else False
    head = data[:end].lower()
    body = memoryview(data)[end + 4 :]
    lengths = _CONTENT_LENGTH.findall(head)
    if _TRANSFER_ENCODING.search(head):
        return None if lengths else _chunked_complete(body)
    if not lengths:
        return True
    if len(lengths) > 1 or not lengths[0].strip().isdigit():
        return None
    length = int(lengths[0])
    if length > BUFFERED_BODY_BYTES:
        return None
    return len(body) >= length


def _chunked_complete(body: memoryview) -> bool | None:
    position = 0
    while position < BUFFERED_BODY_BYTES:
        line_end = bytes(body[position : position + 1024]).find(b"\r\n")
        if line_end < 0:
            return False if len(body) - position < 1024 else None
        size_line = bytes(body[position : position + line_end])
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            return None
        if size == 0:  # the last chunk, then trailers up to an empty line
            return bytes(body[position + line_end :]).find(b"\r\n\r\n") >= 0
        position += line_end + 2 + size + 2
        if position > len(body):
            return False
    return None


def error_response(status: int, reason: str, message: str = "") -> bytes:
    """A short JSON answer in the API's error shape, closing the connection."""
    text = f"{reason}: {message}" if message else reason
    body = json.dumps({"error": {"code": _CODES.get(status, "error"), "message": text[:300]}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def write_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's error page, as JSON (replaces `gunicorn.util.write_error`)."""
    util.write_nonblock(sock, error_response(status_int, reason, mesg))


util.write_error = write_error

_TIMED_OUT = error_response(408, "Request Timeout", f"no whole request within {REQUEST_TIMEOUT} s")


def _bound_socket_waits(sock: socket.socket) -> None:
    """Make each blocking read or write on `sock` fail after REQUEST_TIMEOUT s instead of waiting on."""
    timeval = struct.pack("ll", REQUEST_TIMEOUT, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class BufferingWorker(ThreadWorker):
    """gthread, with each request read whole on the event loop before a thread takes it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reading: deque = deque()  # connections sending a request, oldest deadline first
        self.buffered_bytes = 0
        self.stopping = False

    def enqueue_req(self, conn) -> None:
        if not hasattr(conn, "received"):
            _bound_socket_waits(conn.sock)
        # Bytes a previous request's body read pulled in ahead are the start of this one.
        conn.received = bytearray(conn.parser.unreader.take_buffered() if conn.parser else b"")
        if self.cfg.is_ssl or self.buffered_bytes > BUFFER_BUDGET:
            self._hand_over(conn)
            return
        conn.sock.setblocking(False)
        whole = self._receive(conn)  # what has arrived already, without a trip through the poller
        if whole is None:
            self.nr_conns -= 1
            conn.close()
        elif whole:
            self._hand_over(conn)
        else:
            conn.deadline = time.monotonic() + (STOP_GRACE if self.stopping else REQUEST_TIMEOUT)
            self.buffered_bytes += len(conn.received)
            self.reading.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn, _sock) -> None:
        before = len(conn.received)
        whole = self._receive(conn)
        self.buffered_bytes += len(conn.received) - before
        if whole is False:
            return
        self._stop_reading(conn)
        if whole is None:
            self.nr_conns -= 1
            conn.close()
        else:
            self._hand_over(conn)

    def _receive(self, conn) -> bool | None:
        """Read what the client sent: is its request whole (or for the parser to judge)? None: it left."""
        try:
            data = conn.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            return None
        if data is not None:
            if not data:
                # The client closed its side: serve what it sent if that is a request, or at
                # least a whole head (the app then answers a cut-off body with a JSON 400).
                whole = request_complete(conn.received) is not False or b"\r\n\r\n" in conn.received
                return True if conn.received and whole else None
            conn.received += data
        return request_complete(conn.received) is not False

    def _stop_reading(self, conn) -> None:
        self.poller.unregister(conn.sock)
        self.reading.remove(conn)
        self.buffered_bytes -= len(conn.received)

    def _hand_over(self, conn) -> None:
        conn.prefetched, conn.received = bytes(conn.received), bytearray()
        super().enqueue_req(conn)

    def handle(self, conn):
        # In a thread: give the parser what the event loop read, then serve as gthread does.
        if conn.prefetched:
            conn.data_ready = True  # no need to wait for the first byte: it is here
            conn.init()
            conn.parser.unreader.unread(conn.prefetched)
            conn.prefetched = b""
        return super().handle(conn)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        if not self.alive and not self.stopping:
            self.stopping = True
            for conn in self.reading:  # same order kept: every deadline capped alike
                conn.deadline = min(conn.deadline, now + STOP_GRACE)
        while self.reading and self.reading[0].deadline <= now:
            conn = self.reading[0]
            self._stop_reading(conn)
            self.nr_conns -= 1
            with suppress(OSError):
                conn.sock.send(_TIMED_OUT)
            conn.close()
