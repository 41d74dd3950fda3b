"""Redis behind Sentinel: `redis+sentinel://` URLs, connections to whichever node is primary,
and a watch that moves every connection of a process to a new primary after a failover.

REDIS_URL takes the form rq-dashboard understands, with TLS as `rediss+sentinel://`:

    redis+sentinel://[[user]:password@]host:port[,host:port…]/service_name[/db][?sentinel_password=…]

The user part authenticates to the Redis nodes; `sentinel_username` and `sentinel_password`
(percent-encoded) authenticate to the Sentinels, which often have no password or another one.

Every connection asks the Sentinels for the primary when it connects (redis-py's
`SentinelManagedConnection`), so a reconnect after a failover reaches the new primary. What
reconnects an *established* connection is `PrimaryWatch`: once a second each process asks the
Sentinels which node is primary and shuts the socket of every connection it holds to another
node. A call in flight on such a socket fails with a ConnectionError at once — a blocking
dequeue, a pub/sub listener, a long poll, a heartbeat — and its retry reconnects to the new
primary. Without the watch a connection to a frozen primary hangs until its socket timeout,
and one to a demoted primary (now a read-only replica) keeps reading stale data and fails only
on its next write.

Connections are built from plain, picklable arguments (`SentinelTarget`): RQ rebuilds a
connection from its pool's keyword arguments in every process it forks (worker pool, scheduler).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.connection import Connection, ConnectionPool, SSLConnection
from redis.sentinel import Sentinel, SentinelManagedConnection

log = logging.getLogger(__name__)

SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
# How often each process asks the Sentinels which node is primary (seconds).
WATCH_SECONDS = 1.0
# How long a question to one Sentinel may take (seconds): another one is asked next.
SENTINEL_TIMEOUT = 1.0
# The watch's thread, started by a process's first connection: a work-horse's first job starts
# it in the horse, where it is the Redis client's thread, not one the job left running.
WATCH_THREAD = "sentinel-watch"

# Redis's refusal under min-replicas-to-write, alone or from a Lua script's first write (which
# fails before the script has written anything: the condition holds for the whole script).
_NO_REPLICAS = re.compile(r"(^|[\s:-])NOREPLICAS Not enough good replicas")

# Query parameters of a Sentinel URL, and the TLS options they carry to every connection.
_TLS_OPTIONS = ("ssl_cert_reqs", "ssl_check_hostname", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_OPTIONS = ("sentinel_username", "sentinel_password", "db", *_TLS_OPTIONS)


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SCHEMES


@dataclass(frozen=True)
class SentinelTarget:
    """Where the primary of one service is found: the Sentinels, and how to talk to them."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    tls: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    # TLS options (ssl_cert_reqs, ssl_ca_certs, …) used for the Sentinels and the Redis nodes.
    tls_options: tuple[tuple[str, Any], ...] = ()

    def sentinel_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            "socket_timeout": SENTINEL_TIMEOUT,
            "username": self.sentinel_username,
            "password": self.sentinel_password,
        }
        if self.tls:
            kwargs.update(ssl=True, **dict(self.tls_options))
        return kwargs


@dataclass(frozen=True)
class SentinelURL:
    """A parsed `redis+sentinel://` URL: the target, and what the Redis nodes are asked for."""

    target: SentinelTarget
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def connection_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "sentinel": self.target,
            "db": self.db,
            "username": self.username,
            "password": self.password,
        }
        if self.target.tls:
            kwargs.update(dict(self.target.tls_options))
        return kwargs


def parse(url: str) -> SentinelURL:
    """`url` as a SentinelURL; ValueError naming what is wrong (and quoting none of it)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError("it must start with redis+sentinel:// or rediss+sentinel://")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = tuple(_address(host) for host in hosts.split(","))
    path = [unquote(piece) for piece in parts.path.split("/") if piece]
    if not path:
        raise ValueError("it must name the service after the Sentinels' addresses (…/service_name[/db])")
    if len(path) > 2:
        raise ValueError("its path must be /service_name or /service_name/db")
    query = {name: values[-1] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(_OPTIONS)}")
    db_text = query.get("db") or (path[1] if len(path) > 1 else "0")
    if not db_text.isdigit():
        raise ValueError("its database must be a number")
    tls_options = tuple(
        (name, value.lower() not in ("false", "0", "no") if name == "ssl_check_hostname" else value)
        for name, value in query.items()
        if name in _TLS_OPTIONS
    )
    target = SentinelTarget(
        sentinels=sentinels,
        service_name=path[0],
        tls=scheme == "rediss+sentinel",
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
        tls_options=tls_options,
    )
    return SentinelURL(target=target, db=int(db_text), username=username, password=password)


def _address(text: str) -> tuple[str, int]:
    host, colon, port = text.strip().rpartition(":")
    if not colon:
        host, port = text.strip(), str(DEFAULT_SENTINEL_PORT)
    host = host.strip("[]")  # an IPv6 address in brackets
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("each Sentinel must be host:port, separated by commas")
    return host, int(port)


def client(url: str, redis_class: type[redis.Redis] = redis.Redis, **kwargs: Any) -> redis.Redis:
    """A `redis_class` client of the primary a Sentinel URL names; `kwargs` as for from_url."""
    parsed = parse(url)
    connection_class = SentinelSSLConnection if parsed.target.tls else SentinelConnection
    pool = ConnectionPool(connection_class=connection_class, **parsed.connection_kwargs(), **kwargs)
    connection = redis_class(connection_pool=pool)
    connection.auto_close_connection_pool = True
    return connection


class _Primary:
    """What redis-py's SentinelManagedConnection asks of its pool, answered from one process-wide
    Sentinel client per target (the connection's pool is a plain ConnectionPool RQ can rebuild)."""

    is_master = True
    check_connection = False

    def __init__(self, target: SentinelTarget) -> None:
        self.service_name = target.service_name
        self.sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs())

    def get_master_address(self) -> tuple[str, int]:
        """The primary's address; MasterNotFoundError (a ConnectionError) while there is none,
        which the caller's retry policy rides out as it rides out a restart."""
        return self.sentinel.discover_master(self.service_name)


class SentinelConnection(SentinelManagedConnection):
    """A connection to the current primary of `sentinel` (a SentinelTarget), watched by the
    process's PrimaryWatch."""

    def __init__(self, *, sentinel: SentinelTarget, **kwargs: Any) -> None:
        self.sentinel = sentinel
        super().__init__(connection_pool=WATCH.primary(sentinel), **kwargs)

    def connect(self) -> None:
        # redis-py's Connection.connect, not SentinelManagedConnection's: both end in
        # connect_check_health, which resolves the primary below.
        return Connection.connect(self)

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        # Every way into a connection ends here, including a command sent on a connection that
        # was dropped (redis-py reconnects it without asking SentinelManagedConnection, to the
        # address it had: a dead primary's). Ask the Sentinels first, every time.
        if self._sock:
            return
        self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)
        WATCH.add(self)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.exceptions.ResponseError as error:
            if not _NO_REPLICAS.search(str(error)):
                raise
            # min-replicas-to-write: this node has lost its replicas, and applied nothing. It is
            # a primary cut off from the rest (a partition that healed after a failover: the
            # Sentinels demote it within seconds) or one whose replicas are away. Either way a
            # reconnect, which asks the Sentinels, is the way on: for the caller's retry policy
            # it is a connection error, as redis-py makes READONLY from a demoted primary.
            self.disconnect()
            raise redis.exceptions.ConnectionError(f"the primary refuses writes: {error}") from error

    def repr_pieces(self) -> list[tuple[str, Any]]:
        service = self.sentinel.service_name
        return [("service", service), ("host", self.host), ("port", self.port), ("db", self.db)]


class SentinelSSLConnection(SentinelConnection, SSLConnection):
    pass


class PrimaryWatch:
    """Per process: every Sentinel-managed connection, and a thread that shuts those held to a
    node that is no longer the primary. The thread runs while any of them is connected."""

    def __init__(self) -> None:
        self._connections: weakref.WeakSet[SentinelConnection] = weakref.WeakSet()
        self._primaries: dict[SentinelTarget, _Primary] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # A forked child (work-horse, scheduler, pool worker) has none of its parent's threads.
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._thread = None
        self._primaries = {}

    def primary(self, target: SentinelTarget) -> _Primary:
        with self._lock:
            if target not in self._primaries:
                self._primaries[target] = _Primary(target)
            return self._primaries[target]

    def add(self, connection: SentinelConnection) -> None:
        """Watch `connection` (it has just connected) while it is connected."""
        with self._lock:
            self._connections.add(connection)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=WATCH_THREAD, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            threading.Event().wait(WATCH_SECONDS)
            with self._lock:
                connections = [c for c in self._connections if c._sock is not None]
                if not connections:  # the next connect starts another
                    self._thread = None
                    return
            self.check(connections)

    def check(self, connections: list[SentinelConnection] | None = None) -> int:
        """Shut every connection held to a node that is not its target's primary now; how many."""
        if connections is None:
            with self._lock:
                connections = list(self._connections)
        primaries: dict[SentinelTarget, tuple[str, int] | None] = {}
        shut = 0
        for connection in connections:
            target = connection.sentinel
            if target not in primaries:
                try:
                    primaries[target] = self.primary(target).get_master_address()
                except redis.exceptions.RedisError:
                    primaries[target] = None  # no primary yet: wait for the Sentinels' choice
            primary = primaries[target]
            sock = connection._sock
            if primary is None or sock is None or _same_address((connection.host, connection.port), primary):
                continue
            try:
                # Not close(): the thread using the connection cleans it up, once its call fails.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue  # already closed
            shut += 1
        if shut:
            moved = ", ".join(f"{t.service_name} at {a[0]}:{a[1]}" for t, a in primaries.items() if a)
            log.info("Redis primary is %s: %d connection(s) of this process reconnect to it", moved, shut)
        return shut


def _same_address(held: tuple[Any, Any], primary: tuple[str, int]) -> bool:
    """Sentinels answer with an IP address; a connection made from one holds the same text."""
    return str(held[0]) == str(primary[0]) and int(held[1] or 0) == int(primary[1])


WATCH = PrimaryWatch()
