"""Every Redis client Afterward opens, and checks on the Redis they connect to.

One factory, so that every client — web, workers, the rate limiter, the release check —
honours REDIS_URL and its TLS opt-in (`Settings.redis_client_url`) the same way, with the
timeouts its role needs.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from functools import cache
from typing import Literal

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from jobs import sentinel
from jobs.settings import Settings, get_settings

log = logging.getLogger(__name__)

Role = Literal["web", "worker", "tool"]

# Waits between a worker's retries of a Redis call: 0.1 s, doubling, at most 2 s.
WORKER_BACKOFF_BASE = 0.1
WORKER_BACKOFF_CAP = 2.0


# A `password=` query parameter, which redis-py accepts as well as the user part, and the
# Sentinels' `sentinel_password=`.
_PASSWORD_PARAMETER = re.compile(r"([?&;](?:sentinel_)?password=)[^&;#]*", re.IGNORECASE)


def redacted(url: str) -> str:
    """`url` without its password, for printing, even when the URL is malformed.

    Not parsed as a URL: a password holding an unencoded `/`, `?`, `#` or `@` would leave part
    of itself outside what a parser calls the password. Everything between `://` and the last
    `@` is the user part; its password (after the first `:`) is hidden, as is a `password=`
    parameter.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "(not shown: not a redis://, rediss://, redis+sentinel:// or unix:// URL)"
    userinfo, at, location = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{':***' if colon else ''}@{location}"
    return f"{scheme}://" + _PASSWORD_PARAMETER.sub(r"\1***", rest)


def url_problem(url: str) -> str | None:
    """Why redis-py cannot use `url`, in words that quote nothing of it; None when it can."""
    if sentinel.is_sentinel_url(url):
        try:
            sentinel.parse(url)
        except ValueError as error:
            return str(error)
        return None
    try:
        parse_url(url)
    except ValueError:
        # Not the error's own message: it can quote part of a password (as a "port").
        return (
            "redis-py cannot use it (it must start with redis://, rediss://, redis+sentinel://, "
            "rediss+sentinel:// or unix://, and a "
            "password holding / ? # or @ must be percent-encoded, e.g. / as %2F)"
        )
    return None


def check_redis_url(url: str) -> None:
    """Exit with one line naming the problem (never a traceback) when redis-py cannot use `url`."""
    problem = url_problem(url)
    if problem:
        raise SystemExit(f"REDIS_URL ({redacted(url)}) is unusable: {problem}.")


def connect(settings: Settings | None = None, role: Role = "web") -> redis.Redis:
    """A client for REDIS_URL.

    web: fails fast (the API answers 503 at once). worker: rides out a Redis restart or a
    network blip for `Settings.worker_retry_seconds`. tool: one patient try (release check).
    """
    settings = settings or get_settings()
    check_redis_url(settings.redis_url)
    url = settings.redis_client_url
    if role == "worker":
        return WorkerRedis.from_url(url)
    if role == "tool":
        return client(url, socket_connect_timeout=10, socket_timeout=10)
    return client(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)


def client(url: str, redis_class: type[redis.Redis] = redis.Redis, **kwargs: object) -> redis.Redis:
    """`redis_class.from_url(url, **kwargs)`, for plain URLs and `redis+sentinel://` ones alike
    (a client of the current primary, which follows a failover: jobs.sentinel)."""
    if sentinel.is_sentinel_url(url):
        return sentinel.client(url, redis_class, **kwargs)
    return redis_class.from_url(url, **kwargs)


class WorkerRedis(redis.Redis):
    """The Redis client of worker processes (`rq --connection-class`): calls wait for Redis.

    A job that finishes while Redis restarts still records its result once Redis is back.
    The wait is bounded by the job heartbeat (see `Settings.worker_retry_seconds`): a worker
    cut off for longer gives up, and its job is recovered as abandoned, never run twice at once.
    """

    @classmethod
    def from_url(cls, url: str, **kwargs):  # type: ignore[override]
        check_redis_url(url)
        backoff = ExponentialBackoff(WORKER_BACKOFF_CAP, WORKER_BACKOFF_BASE)
        retries = retries_within(get_settings().worker_retry_seconds)
        kwargs.setdefault("retry", ReportingRetry(backoff, retries, process_outage()))
        kwargs.setdefault("retry_on_error", [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
        kwargs.setdefault("health_check_interval", 30)
        if sentinel.is_sentinel_url(url):
            return sentinel.client(url, cls, **kwargs)
        return super().from_url(url, **kwargs)


class Outage:
    """Says once that Redis is unreachable, and once that it answers again, however many
    calls fail in between (RQ logs every retry of its work loop and its pub/sub thread)."""

    def __init__(self, url: str) -> None:
        self.url = redacted(url)
        self.since: float | None = None
        # A worker's children (its work-horse, its scheduler) leave the saying to the worker.
        self.muted = False
        self._lock = threading.Lock()  # the work loop, RQ's threads and the probe all report
        # A fork (a work-horse, the scheduler) may happen while another thread holds the lock.
        os.register_at_fork(after_in_child=self._new_lock)

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def down(self, error: BaseException) -> bool:
        """Record a failed call; True for the first of an outage (the one to report)."""
        with self._lock:
            if self.since is not None or self.muted:
                return False
            self.since = time.monotonic()
        log.error("cannot reach Redis at %s (%s); retrying until it answers", self.url, _reason(error))
        return True

    def up(self) -> None:
        """Record a call that worked."""
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            log.info("Redis at %s answers again, after %.0f s", self.url, time.monotonic() - since)

    def __deepcopy__(self, memo: dict) -> Outage:
        return self  # shared by every connection's copy of the retry policy (ReportingRetry)


@cache
def process_outage() -> Outage:
    """This process's Outage: every worker connection reports to it."""
    return Outage(get_settings().redis_url)


class ReportingRetry(Retry):
    """redis-py's retry policy, telling the process's Outage when a call failed and when one
    that failed then worked: a restart that a call rides out with its retries is still said."""

    def __init__(self, backoff: ExponentialBackoff, retries: int, outage: Outage) -> None:
        super().__init__(backoff, retries)
        self.outage = outage

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # type: ignore[no-untyped-def]
        failed = False

        def report(error: Exception, *count: int) -> object:
            nonlocal failed
            failed = True
            self.outage.down(error)
            return fail(error, *count)

        result = super().call_with_retry(do, report, is_retryable, with_failure_count)
        if failed:
            self.outage.up()
        return result


class RedisProbe:
    """PINGs Redis every PROBE_SECONDS on a connection of its own, with a short timeout, and
    reports to an Outage: a worker says that Redis is away within seconds, whether it restarts
    (connections refused) or stops answering (paused, partitioned), even while the worker's own
    calls still ride it out with their retries and their longer socket timeout."""

    def __init__(self, url: str, outage: Outage) -> None:
        self.outage = outage
        self.client = client(
            url,
            socket_connect_timeout=PROBE_TIMEOUT,
            socket_timeout=PROBE_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(PROBE_TIMEOUT + 1)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.wait(PROBE_SECONDS):
            try:
                self.client.ping()
            except redis.exceptions.RedisError as error:
                self.outage.down(error)
            else:
                self.outage.up()


# How often a worker's probe PINGs Redis, and how long it waits for the answer (seconds).
PROBE_SECONDS = 1.0
PROBE_TIMEOUT = 2.0


def wait_for_redis(connection: redis.Redis, outage: Outage) -> None:
    """Block until `connection` answers a PING, saying so once through `outage` meanwhile."""
    wait = WORKER_BACKOFF_BASE
    while True:
        try:
            connection.ping()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            outage.down(error)
            time.sleep(wait)
            wait = min(wait * 2, 5.0)
        else:
            outage.up()
            return


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text[:300]


def retries_within(seconds: float) -> int:
    """How many retries of the worker backoff fit in `seconds` of waiting."""
    waited, retries, pause = 0.0, 0, WORKER_BACKOFF_BASE
    while waited + min(pause, WORKER_BACKOFF_CAP) <= seconds:
        waited += min(pause, WORKER_BACKOFF_CAP)
        pause *= 2
        retries += 1
    return retries


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
