"""Redis connections for workers, and checks on the Redis they connect to."""

from __future__ import annotations

import logging

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

# A worker rides out a Redis restart or a network blip this long before giving up on a call.
WORKER_RETRIES = 40
WORKER_BACKOFF = ExponentialBackoff(cap=2.0, base=0.1)


class WorkerRedis(redis.Redis):
    """The Redis client of worker processes (`rq --connection-class`): calls wait for Redis.

    A job that finishes while Redis restarts still records its result once Redis is back,
    instead of failing the job for want of a connection. The web process keeps redis-py's
    short retries: it answers 503 at once instead.
    """

    @classmethod
    def from_url(cls, url: str, **kwargs):  # type: ignore[override]
        kwargs.setdefault("retry", Retry(WORKER_BACKOFF, WORKER_RETRIES))
        kwargs.setdefault("retry_on_error", [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
        kwargs.setdefault("health_check_interval", 30)
        return super().from_url(url, **kwargs)


def eviction_policy(connection: redis.Redis) -> str | None:
    """Redis's maxmemory-policy, from INFO (managed Redis often refuses CONFIG GET)."""
    try:
        policy = connection.info("memory").get("maxmemory_policy")
    except redis.exceptions.ResponseError:  # INFO refused: the policy is unknown, not wrong
        return None
    return policy.decode() if isinstance(policy, bytes) else policy


def warn_if_evicting(connection: redis.Redis) -> str | None:
    """Log loudly when Redis may evict keys: an evicting Redis silently drops queued jobs."""
    try:
        policy = eviction_policy(connection)
    except redis.exceptions.RedisError:
        return None
    if policy and policy != "noeviction":
        log.error(
            "REDIS EVICTS KEYS: maxmemory-policy is %r. Under memory pressure Redis will delete "
            "queued jobs, results and index documents without telling anyone. Set it to 'noeviction'.",
            policy,
        )
        return policy
    return None
