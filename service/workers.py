"""What the web process knows about workers, read from RQ's worker registry."""

from __future__ import annotations

import redis
from rq.worker_registration import REDIS_WORKER_KEYS


def live_workers(connection: redis.Redis) -> list[str]:
    """Names of registered workers whose heartbeat key still exists and that have not died."""
    names = sorted(key.decode() for key in connection.smembers(REDIS_WORKER_KEYS))
    if not names:
        return []
    with connection.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.exists(name)
            pipe.hexists(name, "death")
        answers = pipe.execute()
    return [
        name
        for name, exists, dead in zip(names, answers[::2], answers[1::2], strict=True)
        if exists and not dead
    ]
