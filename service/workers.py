"""What the web process knows about workers, read from RQ's worker registry."""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from rq.worker_registration import REDIS_WORKER_KEYS

from jobs.settings import get_settings
from jobs.times import parse_iso


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
    """A worker hash's `last_heartbeat` and `death` fields: has it heartbeated lately, alive?

    Workers heartbeat at least every JOB_MONITORING_INTERVAL, idle or busy; one silent for as
    long as a running job's heartbeat lasts is dead (SIGKILLed, its host gone), whatever its
    hash says, as its job is to the maintenance round.
    """
    if last_heartbeat is None or death is not None:
        return False
    beat = parse_iso(last_heartbeat.decode())
    return (datetime.now(UTC) - beat).total_seconds() < get_settings().heartbeat_ttl
