"""What the web process knows about workers, read from RQ's worker registry."""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from rq.worker_registration import REDIS_WORKER_KEYS

from jobs.times import parse_iso

# A worker that has not written a heartbeat for this long is dead, whatever its key says
# (idle workers heartbeat every MAINTENANCE_INTERVAL, busy ones every few seconds).
STALE_AFTER_SECONDS = 60


def live_workers(connection: redis.Redis) -> list[str]:
    """Keys of registered workers that have heartbeated lately and have not died."""
    names = sorted(key.decode() for key in connection.smembers(REDIS_WORKER_KEYS))
    if not names:
        return []
    with connection.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hmget(name, "last_heartbeat", "death")
        answers = pipe.execute()
    now = datetime.now(UTC)
    live = []
    for name, (heartbeat, death) in zip(names, answers, strict=True):
        if heartbeat is None or death is not None:
            continue
        beat = parse_iso(heartbeat.decode())
        if (now - beat).total_seconds() < STALE_AFTER_SECONDS:
            live.append(name)
    return live
