"""REDIS_URL through Sentinel: the URL form, the clients every process makes from it, and the
watch that moves established connections to a new primary, on real Sentinels at the end (the
whole service through a failover: tests/test_failover.py)."""

from __future__ import annotations

import pickle
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.connection import ConnectionPool
from redis.sentinel import SentinelManagedConnection
from rq.connections import parse_connection

from jobs import sentinel
from jobs.connection import WorkerRedis, connect, redacted, url_problem
from jobs.settings import Settings
from scripts.sentinel import SentinelTopology
from tests.support import tls_capable_redis_server

URL = "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380,sentinel-c/mymaster/2"


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    parsed = sentinel.parse(URL)
    assert parsed.target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-c", 26379))
    assert parsed.target.service_name == "mymaster"
    assert parsed.db == 2
    assert parsed.password == "s3cret"
    assert parsed.username is None
    assert not parsed.target.tls
    # Without a sentinel_password the Sentinels are asked without one: theirs is often different.
    assert parsed.target.sentinel_password is None


def test_the_sentinels_password_is_separate_and_percent_decoded() -> None:
    parsed = sentinel.parse("redis+sentinel://app:p%2Fw@h:1/svc?sentinel_password=x%40y&db=3")
    assert (parsed.username, parsed.password, parsed.db) == ("app", "p/w", 3)
    assert parsed.target.sentinel_password == "x@y"
    assert parsed.target.sentinel_kwargs()["password"] == "x@y"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://h:1", "name the service"),
        ("redis+sentinel://h:1/svc/0/extra", "/service_name/db"),
        ("redis+sentinel://h:notaport/svc", "host:port"),
        ("redis+sentinel://h:1/svc/zero", "must be a number"),
        ("redis+sentinel://h:1/svc?socket_timeout=1", "unknown parameter"),
    ],
)
def test_an_unusable_sentinel_url_is_refused_with_a_reason(url: str, problem: str) -> None:
    reason = url_problem(url)
    assert reason is not None and problem in reason
    with pytest.raises(SystemExit, match="unusable"):
        connect(Settings(redis_url=url))


def test_a_usable_sentinel_url_has_no_problem_and_its_passwords_are_never_printed() -> None:
    assert url_problem(URL) is None
    shown = redacted("redis+sentinel://app:s3cret@h:1,h:2/svc?sentinel_password=other")
    assert "s3cret" not in shown and "other" not in shown
    assert shown.startswith("redis+sentinel://app:***@h:1,h:2/svc")


def test_tls_sentinel_urls_use_tls_for_the_sentinels_and_the_nodes() -> None:
    settings = Settings(redis_url="rediss+sentinel://h:1/svc", redis_tls_verify=0)
    parsed = sentinel.parse(settings.redis_client_url)
    assert parsed.target.tls
    kwargs = parsed.target.sentinel_kwargs()
    assert kwargs["ssl"] is True
    assert kwargs["ssl_cert_reqs"] == "none" and kwargs["ssl_check_hostname"] is False
    client = connect(settings)
    try:
        assert client.connection_pool.connection_class is sentinel.SentinelSSLConnection
        assert client.connection_pool.connection_kwargs["ssl_cert_reqs"] == "none"
    finally:
        client.close()


@pytest.mark.parametrize("role", ["web", "worker", "tool"])
def test_every_role_connects_through_sentinel(role: str) -> None:
    client = connect(Settings(redis_url=URL), role=role)  # type: ignore[arg-type]
    try:
        pool = client.connection_pool
        assert pool.connection_class is sentinel.SentinelConnection
        assert pool.connection_kwargs["sentinel"].service_name == "mymaster"
        assert pool.connection_kwargs["db"] == 2
    finally:
        client.close()


def test_rq_can_rebuild_a_worker_connection_in_another_process() -> None:
    """RQ's worker pool and scheduler rebuild the connection from its pool's keyword
    arguments in the processes they fork: those hold plain values, never a live pool."""
    client = WorkerRedis.from_url(URL)
    try:
        connection_class, pool_class, pool_kwargs = parse_connection(client)
        assert connection_class is WorkerRedis
        assert pool_class is sentinel.SentinelConnection
        pool_kwargs = {k: v for k, v in pool_kwargs.items() if k != "retry"}  # deep-copied by RQ
        copied = pickle.loads(pickle.dumps(pool_kwargs))
        rebuilt = WorkerRedis(connection_pool=ConnectionPool(connection_class=pool_class, **copied))
        connection = rebuilt.connection_pool.make_connection()
        assert isinstance(connection, sentinel.SentinelConnection)
        assert connection.sentinel == client.connection_pool.connection_kwargs["sentinel"]
        rebuilt.close()
    finally:
        client.close()


def test_a_primary_refusing_writes_for_want_of_replicas_is_left_for_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NOREPLICAS (min-replicas-to-write): the node applied nothing and has lost its replicas,
    as an old primary does when a partition heals after a failover. The connection drops and
    the caller's retry policy reconnects through the Sentinels, as for a demoted primary."""

    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise redis.exceptions.ResponseError("NOREPLICAS Not enough good replicas to write.")

    def refuse_in_script(self: object, *args: object, **kwargs: object) -> None:
        raise redis.exceptions.ResponseError(
            "Error running script (call to f_ca39): @user_script:54: @user_script: 54: "
            "-NOREPLICAS Not enough good replicas to write."
        )

    connection = sentinel.SentinelConnection(sentinel=sentinel.parse(URL).target)
    dropped: list[bool] = []
    monkeypatch.setattr(connection, "disconnect", lambda *args, **kwargs: dropped.append(True))
    for refusal in (refuse, refuse_in_script):
        monkeypatch.setattr(SentinelManagedConnection, "read_response", refusal)
        with pytest.raises(redis.exceptions.ConnectionError, match="refuses writes"):
            connection.read_response()
    assert dropped == [True, True]

    def other(self: object, *args: object, **kwargs: object) -> None:
        raise redis.exceptions.ResponseError(
            "WRONGTYPE Operation against a key holding the wrong kind of value"
        )

    monkeypatch.setattr(SentinelManagedConnection, "read_response", other)
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        connection.read_response()
    assert dropped == [True, True]


class _Primary:
    def __init__(self, address: tuple[str, int] | None) -> None:
        self.address = address

    def get_master_address(self) -> tuple[str, int]:
        if self.address is None:
            raise sentinel.redis.exceptions.ConnectionError("No master found")
        return self.address


def test_the_watch_shuts_connections_held_to_a_node_that_is_no_longer_primary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The socket of a connection to the old primary is shut, so a call blocked on it (a
    dequeue, a pub/sub listener) fails at once and its retry reconnects; connections to the
    primary are left alone, and nothing is shut while the Sentinels name no primary."""
    watch = sentinel.PrimaryWatch()
    target = sentinel.parse(URL).target
    primary = _Primary(("10.0.0.9", 6379))
    monkeypatch.setattr(watch, "primary", lambda _target: primary)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        stale, current = (_held(target, pairs[0][0], "10.0.0.8"), _held(target, pairs[1][0], "10.0.0.9"))
        primary.address = None  # between the old primary's death and the promotion
        assert watch.check([stale, current]) == 0
        primary.address = ("10.0.0.9", 6379)
        assert watch.check([stale, current]) == 1
        pairs[0][1].settimeout(2)
        assert pairs[0][1].recv(1) == b""  # the far end sees the connection end
        pairs[1][1].setblocking(False)
        with pytest.raises(BlockingIOError):
            pairs[1][1].recv(1)  # still open
    finally:
        for pair in pairs:
            for end in pair:
                end.close()


def _held(target: sentinel.SentinelTarget, sock: socket.socket, host: str) -> sentinel.SentinelConnection:
    connection = object.__new__(sentinel.SentinelConnection)
    connection.sentinel = target
    connection._sock = sock
    connection.host, connection.port = host, 6379
    return connection


# ---------------------------------------------------------------- on real Sentinels


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    with SentinelTopology(tmp_path / "ha") as started:
        yield started


def _in_thread(call: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["value"] = call()
        except Exception as error:  # the assertion says which
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _open(sock: socket.socket) -> bool:
    """Whether a connection's socket can still carry a call (not shut by the watch or the peer)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        # Readable with nothing to read is the end of the stream; an idle open socket is not readable.
        return not readable or sock.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


@pytest.mark.integration
def test_calls_blocked_on_a_frozen_primary_move_to_the_new_one(topology: SentinelTopology) -> None:
    """A partition (the primary frozen, its sockets open): a worker's blocking pop and its
    pub/sub listener, which would wait on the frozen node until a socket timeout (a worker's
    connection has none), are moved by the watch once a replica is promoted; when the old primary wakes
    up it is demoted, and the process's connections stay on the new one."""
    worker = WorkerRedis.from_url(topology.url)
    listener = worker.pubsub(ignore_subscribe_messages=True)  # as a worker's webhook sender listens
    try:
        worker.delete("afterward:test:list")
        listener.subscribe("afterward:test:channel")
        popped, popped_outcome = _in_thread(lambda: worker.blpop(["afterward:test:list"], timeout=120))
        heard, heard_outcome = _in_thread(lambda: _next_message(listener, deadline=120))
        time.sleep(0.5)  # both are blocked on the primary
        old = topology.stop_primary()
        new = topology.wait_for_failover(old, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _connected_clients(new) < 2:
            time.sleep(0.1)
        publisher = new.client()
        for _ in range(50):  # the listener re-subscribes on its own once it reconnects
            if publisher.publish("afterward:test:channel", "after") or not heard.is_alive():
                break
            time.sleep(0.2)
        publisher.rpush("afterward:test:list", "after")
        popped.join(30)
        heard.join(30)
        assert popped_outcome.get("value") == (b"afterward:test:list", b"after"), popped_outcome
        assert heard_outcome.get("value") == b"after", heard_outcome
        topology.cont(old)
        topology.wait_until(lambda: old.role() == "slave", 60, "the old primary to be demoted")
        worker.set("afterward:test:key", "written after the partition healed")
        assert new.client().get("afterward:test:key") == b"written after the partition healed"
        # The watch looks once a second: a connection still open to the demoted node is shut
        # at its next look (an idle one keeps its shut socket until its next call reconnects it).
        deadline = time.monotonic() + 10
        while True:
            ports = {c.port for c in sentinel.WATCH._connections if c._sock is not None and _open(c._sock)}
            if ports == {new.port} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ports == {new.port}, f"connections to {ports}, primary {new.port}"
    finally:
        listener.close()
        worker.close()


def _next_message(listener: redis.client.PubSub, deadline: float) -> object:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        message = listener.get_message(timeout=1.0)
        if message is not None:
            return message["data"]
    raise TimeoutError("no message")


def _connected_clients(node: object) -> int:
    try:
        return int(node.client().info("clients")["connected_clients"])  # type: ignore[attr-defined]
    except redis.RedisError:
        return 0


@pytest.mark.integration
def test_a_tls_sentinel_url_follows_a_failover_over_tls(tmp_path: Path) -> None:
    """rediss+sentinel://: the Sentinels and the data nodes speak only TLS; a worker's client
    verifies them against the given CA, survives the primary's SIGKILL and reaches the new
    one; without the CA the certificate is refused and nothing connects."""
    server = tls_capable_redis_server()
    if server is None:
        pytest.skip("needs a redis-server built with TLS (Debian's redis-server); the embedded one has none")
    with SentinelTopology(tmp_path / "tls", tls_server=server) as topology:
        assert topology.url.startswith("rediss+sentinel://")
        worker = WorkerRedis.from_url(topology.url)
        unverified = connect(Settings(redis_url=topology.url.partition("?")[0]), role="tool")
        try:
            worker.set("afterward:test:tls", "before")
            with pytest.raises(redis.exceptions.ConnectionError):
                unverified.get("afterward:test:tls")
            old = topology.kill_primary()
            new = topology.wait_for_failover(old, timeout=60)
            worker.set("afterward:test:tls", "after")  # its retries ride out the failover
            assert new.client().get("afterward:test:tls") == b"after"
        finally:
            worker.close()
            unverified.close()
