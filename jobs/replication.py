"""Acknowledged means replicated: a request's Redis work on one connection, then WAIT on it.

Redis's `WAIT n timeout` blocks until `n` replicas have acknowledged the writes *of the
connection it runs on*. A client shares a pool of connections, so a request's writes (RQ's,
the index store's, ours) may each take a different one, and a WAIT on yet another would
cover none of them. `PinnedPool` wraps a client's pool: inside `pinned()`, every command and
pipeline the current context sends, through any client, queue or job built on that pool,
runs on one connection, held until the block ends. Other threads (and threads the block
starts: they begin with an empty context) use the pool as before.

`Pin.confirm` then writes a mark on that connection and sends WAIT in the same round trip.
The primary replicates one ordered stream, so replicas that have the mark have everything
the request wrote before it, and everything it read (a repeated submission reads the job an
earlier request wrote; a cancel may report a worker's write): no need to know which of the
request's commands changed something. Redis up to 7.0 moved a connection's WAIT offset on
any command; from 7.2 only a command that writes moves it, so without the mark a repeat,
which writes nothing, would be confirmed at once. A connection that had to reconnect during the block
may have written on an earlier socket, perhaps to a primary since replaced, so it is never
confirmed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import redis

from jobs import keys

# Seconds the mark lives: only writing it matters.
MARK_TTL = 60


class NotReplicated(Exception):
    """Fewer replicas than required confirmed a request's writes: whether they last is unknown."""

    def __init__(self, required: int, confirmed: int | None, reason: str) -> None:
        super().__init__(reason)
        self.required = required
        self.confirmed = confirmed  # None when Redis did not answer the WAIT


class Pin:
    """The one connection a block's Redis work runs on, and whether it had to reconnect."""

    def __init__(self, client: redis.Redis, pool: PinnedPool, connection: Any) -> None:
        self.client = client
        self.pool = pool
        self.connection = connection
        self.reconnected = False
        # Called on every connect of this connection object; it is connected already.
        connection.register_connect_callback(self._connected)

    def _connected(self, connection: Any) -> None:
        self.reconnected = True

    def close(self) -> None:
        self.connection.deregister_connect_callback(self._connected)

    def confirm(self, replicas: int, timeout_ms: int) -> int:
        """How many replicas have all this connection wrote and read; NotReplicated when fewer
        than `replicas` say so within `timeout_ms`, or Redis fails meanwhile."""
        if self.pool.current() is not self:
            raise RuntimeError("a pin confirms only inside its own pinned() block")
        if self.reconnected:
            raise NotReplicated(replicas, None, "the connection to Redis was lost during the request")
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(keys.REPLICATION_MARK, repr(time.time()), ex=MARK_TTL)
                pipe.wait(replicas, timeout_ms)
                _, confirmed = pipe.execute()
        except redis.exceptions.RedisError as error:  # the cause is for the log, not the client
            raise NotReplicated(replicas, None, "Redis failed while confirming it") from error
        if self.reconnected:  # the mark went on a new socket: it says nothing of the earlier writes
            raise NotReplicated(replicas, None, "the connection to Redis was lost during the request")
        if confirmed < replicas:
            raise NotReplicated(replicas, confirmed, f"{confirmed} of {replicas} replicas confirmed")
        return confirmed


class PinnedPool:
    """A client's connection pool, except that inside `pinned()` the current context gets one
    connection, whatever asks (commands, pipelines, Lua scripts). Everything else is the
    wrapped pool's, so it wraps any pool: plain, TLS or Sentinel-managed."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self._pin: ContextVar[Pin | None] = ContextVar(f"afterward-pin-{id(self)}", default=None)

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        pin = self._pin.get()
        return pin.connection if pin is not None else self.pool.get_connection(*args, **kwargs)

    def release(self, connection: Any) -> None:
        pin = self._pin.get()
        if pin is None or connection is not pin.connection:
            self.pool.release(connection)

    def current(self) -> Pin | None:
        """The pin of the current context, if any."""
        return self._pin.get()

    def __getattr__(self, name: str) -> Any:
        if name == "pool":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.pool, name)

    @contextmanager
    def pinned(self, client: redis.Redis) -> Iterator[Pin]:
        """Run this context's Redis work on one connection of the pool until the block ends."""
        current = self._pin.get()
        if current is not None:
            yield current
            return
        connection = self.pool.get_connection()  # connected and checked, as the pool hands it out
        try:
            pin = Pin(client, self, connection)
            token = self._pin.set(pin)
            try:
                yield pin
            finally:
                self._pin.reset(token)
                pin.close()
        finally:
            self.pool.release(connection)


def pinnable(client: redis.Redis) -> redis.Redis:
    """A client on `client`'s pool whose work `pinned` can hold to one connection."""
    return redis.Redis(connection_pool=PinnedPool(client.connection_pool))


@contextmanager
def pinned(client: redis.Redis) -> Iterator[Pin]:
    """Run the Redis work of this context on one connection of `client` (made by `pinnable`)."""
    pool = client.connection_pool
    if not isinstance(pool, PinnedPool):
        raise TypeError("the client was not made by jobs.replication.pinnable")
    with pool.pinned(client) as pin:
        yield pin
