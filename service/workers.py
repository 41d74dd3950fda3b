"""What the web process knows about workers, read from RQ's worker registry."""

from __future__ import annotations

import time
from contextlib import suppress
from datetime import UTC, datetime

import redis
from rq.worker_registration import REDIS_WORKER_KEYS

from jobs.times import parse_iso

# A worker that has not written a heartbeat for this long is dead, whatever its key says
# (idle workers heartbeat every MAINTENANCE_INTERVAL, busy ones every few seconds).
STALE_AFTER_SECONDS = 60


def live_workers(connection: redis.Redis, queue: str | None = None) -> list[str]:
    """Keys of registered workers that have heartbeated lately and have not died (and serve
    `queue`, when given)."""
    return [
        name for name, queues in live_worker_queues(connection).items() if queue is None or queue in queues
    ]


def live_worker_queues(connection: redis.Redis) -> dict[str, list[str]]:
    """The queues of each live worker (see `live_workers`), by worker key."""
    names = sorted(key.decode() for key in connection.smembers(REDIS_WORKER_KEYS))
    if not names:
        return {}
    with connection.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hmget(name, "last_heartbeat", "death", "queues")
        answers = pipe.execute()
    return {
        name: (queues or b"").decode().split(",")
        for name, (heartbeat, death, queues) in zip(names, answers, strict=True)
        if is_live(heartbeat, death)
    }


def is_live(last_heartbeat: bytes | None, death: bytes | None) -> bool:
    """A worker hash's `last_heartbeat` and `death` fields: has it heartbeated lately, alive?"""
    if last_heartbeat is None or death is not None:
        return False
    beat = parse_iso(last_heartbeat.decode())
    return (datetime.now(UTC) - beat).total_seconds() < STALE_AFTER_SECONDS


class ActiveCap:
    """How many jobs of one key may be queued or running at once on a queue (KEY_MAX_ACTIVE).

    Automatic (0): one less than the live workers serving the queue, at least 1, read from
    Redis at most every REFRESH_SECONDS per queue and process.
    """

    REFRESH_SECONDS = 10.0

    def __init__(self, connection: redis.Redis, configured: int) -> None:
        self.connection = connection
        self.configured = configured
        self._known: dict[str, tuple[float, int]] = {}

    def for_queue(self, queue: str) -> int:
        if self.configured:
            return self.configured
        read_at, cap = self._known.get(queue, (float("-inf"), 1))
        if time.monotonic() - read_at >= self.REFRESH_SECONDS:
            # On a Redis error the last figure stays; the enqueue itself will answer 503.
            with suppress(redis.RedisError):
                cap = max(1, len(live_workers(self.connection, queue)) - 1)
            self._known[queue] = (time.monotonic(), cap)
        return cap
