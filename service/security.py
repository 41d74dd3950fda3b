"""Who may call the API: API keys, the owner of each job, and per-key rate limits.

Rate limits are fixed windows aligned to the clock: one counter per client and window in
Redis, shared by every web process. A hit is two commands (INCR, EXPIRE) that need no script
and no transaction, so a view that talks to Redis anyway sends them in its own first round
trip (`folds_rate_limit`); other routes send them on their own before the view runs.
`limits` (the library under Flask-Limiter) parses RATE_LIMIT.

Failed authentications (a wrong API key, a wrong dashboard password) are counted per client
address the same way, but only when they happen, so a valid request costs no extra round
trip. Past AUTH_FAILURE_LIMIT, every attempt from that address, right or wrong, answers 429
until the window ends: refusing only the wrong ones would tell a guesser which one was right.
The process that sees the limit crossed remembers the address; another web process learns
it at that address's next failure there, so a guesser gets at most one more guess per
process in a window.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, current_app, g, request
from limits import RateLimitItem
from limits import parse as parse_limit
from redis.exceptions import RedisError

from jobs import keys
from service.errors import ApiError
from service.state import AppState

log = logging.getLogger(__name__)

# Blueprints that make up the API; health probes and the dashboard have rules of their own.
API_BLUEPRINTS = frozenset({"jobs", "search", "queues", "webhooks", "schedules", "batches"})
# Need an API key too, but are not rate limited (Prometheus scrapes on its own schedule).
KEYED_BLUEPRINTS = API_BLUEPRINTS | {"metrics"}

# RATE_LIMIT values that turn rate limiting off.
OFF = frozenset({"", "off", "none", "0"})

# The owner of every job while the API is open (no API_KEYS).
PUBLIC = "public"


def key_owner(key: str) -> str:
    """A stable, non-secret name for an API key: jobs record it, never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def current_owner() -> str:
    """Whose jobs this request may see."""
    return g.get("owner", PUBLIC)


def require_operator() -> None:
    """403 unless this request comes from an operator: one of ADMIN_KEYS, or anyone while the
    API is open (no API_KEYS: one tenant, who runs the service too)."""
    operators = current_app.extensions[OPERATORS]
    if operators is not None and current_owner() not in operators:
        raise ApiError(403, "Only an operator's key (one of ADMIN_KEYS) may do this.", code="forbidden")


def init_security(app: Flask, state: AppState) -> None:
    settings = state.settings
    api_keys = [key.encode() for key in settings.api_keys]
    if not api_keys:
        log.warning(
            "API_KEYS is not set: the API is open to anyone who can reach this port. "
            "Set API_KEYS before exposing the service."
        )
    strangers = set(settings.admin_keys) - set(settings.api_keys)
    if strangers:
        # An operator's key that cannot authenticate is a typo: say so now, not at the first pause.
        raise ValueError(f"ADMIN_KEYS must be among API_KEYS; {len(strangers)} of them are not")
    app.extensions[OPERATORS] = frozenset(map(key_owner, settings.admin_keys)) if api_keys else None

    failure_limit = (
        None if settings.auth_failure_limit.lower() in OFF else parse_limit(settings.auth_failure_limit)
    )
    if failure_limit is not None:
        app.extensions[AUTH_FAILURES] = AuthFailureLimiter(failure_limit, state.redis)

    @app.before_request
    def authenticate() -> None:
        if request.blueprint not in KEYED_BLUEPRINTS or not api_keys:
            return
        refuse_blocked_client()
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        presented = token.strip().encode()
        # Compare with every key, each in constant time, whatever matches first.
        matched = None
        for key in api_keys:
            if hmac.compare_digest(presented, key):
                matched = key
        if scheme.lower() != "bearer" or matched is None:
            count_failed_authentication()
            raise ApiError(
                401,
                "Send a valid API key as 'Authorization: Bearer <key>'.",
                code="unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="afterward"'},
            )
        g.owner = key_owner(matched.decode())

    limit = None if settings.rate_limit.lower() in OFF else parse_limit(settings.rate_limit)
    if limit is None:
        return
    limiter = RateLimiter(limit, state.redis)
    app.extensions[RATE_LIMITER] = limiter

    @app.before_request
    def rate_limit() -> None:
        if request.blueprint not in API_BLUEPRINTS:
            return
        who = g.get("owner") or request.remote_addr or "unknown"
        view = app.view_functions.get(request.endpoint or "")
        folds: Callable[[], bool] | None = getattr(view, "folds_rate_limit", None)
        if folds is not None and folds():
            g.rate_limit_due = who  # the view counts it in its first round trip
            return
        try:
            limiter.hit(who)
        except RedisError:
            return  # Redis down: the request goes on and meets the 503 there


RATE_LIMITER = "afterward-rate-limiter"
OPERATORS = "afterward-operators"  # owner names of ADMIN_KEYS; None: the API is open
AUTH_FAILURES = "afterward-auth-failures"


class RateLimiter:
    """A fixed-window request counter per client, kept in Redis."""

    def __init__(self, limit: RateLimitItem, connection: redis.Redis) -> None:
        self.limit = limit
        self.connection = connection
        self.seconds = limit.get_expiry()

    def queue(self, pipe: Any, who: str) -> float:
        """Queue one hit on `pipe` (its two results come first); returns when the window ends."""
        now = time.time()
        window = int(now // self.seconds)
        ends = (window + 1) * self.seconds
        key = keys.rate_limit(who, self.seconds, window)
        pipe.incr(key)
        # Relative, so a Redis clock ahead of ours cannot end the window early; every hit of
        # the window sets about the same time, and a key left behind expires on its own.
        pipe.expire(key, math.ceil(ends - now) + 1)
        return ends

    def check(self, count: int, ends: float) -> None:
        """429 with Retry-After when `count` hits went over the limit in the window ending at `ends`."""
        if count > self.limit.amount:
            raise ApiError(
                429,
                f"Too many requests: the limit is {self.limit}. Retry after the time in Retry-After.",
                code="too_many_requests",
                headers={"Retry-After": str(max(1, math.ceil(ends - time.time())))},
            )

    def hit(self, who: str) -> None:
        """Count one request now, in a round trip of its own."""
        with self.connection.pipeline(transaction=False) as pipe:
            ends = self.queue(pipe, who)
            count, _ = pipe.execute()
        self.check(count, ends)


class AuthFailureLimiter:
    """Failed authentications per client address, counted in Redis; blocked addresses remembered here."""

    def __init__(self, limit: RateLimitItem, connection: redis.Redis) -> None:
        self.counter = RateLimiter(limit, connection)
        self.blocked: dict[str, float] = {}  # address -> when its window ends
        self.lock = threading.Lock()  # gthread: requests of one process share this

    def refuse_if_blocked(self, address: str) -> None:
        with self.lock:
            ends = self.blocked.get(address, 0.0)
        if ends > time.time():
            raise self.refusal(ends)

    def failed(self, address: str) -> None:
        """Count one failure of `address`; 429 (and remember it) when that is past the limit."""
        try:
            with self.counter.connection.pipeline(transaction=False) as pipe:
                ends = self.counter.queue(pipe, AUTH_FAILURE_PREFIX + address)
                count, _ = pipe.execute()
        except RedisError:
            return  # Redis down: answer 401 as usual rather than lock everyone out
        if count <= self.counter.limit.amount:
            return
        now = time.time()
        with self.lock:
            # Only addresses blocked in the current window are kept.
            for other in [other for other, until in self.blocked.items() if until <= now]:
                del self.blocked[other]
            self.blocked[address] = ends
        raise self.refusal(ends)

    def refusal(self, ends: float) -> ApiError:
        return ApiError(
            429,
            f"Too many failed authentications from this address: the limit is {self.counter.limit}. "
            "Retry after the time in Retry-After.",
            code="too_many_requests",
            headers={"Retry-After": str(max(1, math.ceil(ends - time.time())))},
        )


# Failure counters share the rate limiter's keys, under a name no API key owner can have.
AUTH_FAILURE_PREFIX = "auth-failures:"


def refuse_blocked_client() -> None:
    """429 when this request's address is past its failed-authentication limit (checked first)."""
    limiter: AuthFailureLimiter | None = current_app.extensions.get(AUTH_FAILURES)
    if limiter is not None:
        limiter.refuse_if_blocked(request.remote_addr or "unknown")


def count_failed_authentication() -> None:
    """Count a failed attempt of this request's address, if it sent credentials; 429 past the limit.

    A request without an Authorization header is not a guess (a browser asks for the
    dashboard without credentials first, to learn that it needs some) and is not counted.
    """
    limiter: AuthFailureLimiter | None = current_app.extensions.get(AUTH_FAILURES)
    if limiter is not None and "Authorization" in request.headers:
        limiter.failed(request.remote_addr or "unknown")


def folds_rate_limit(when: Callable[[], bool] = lambda: True) -> Callable:
    """Mark a view that counts its rate-limit hit in its own first pipeline, when `when()` says so.

    The view builds that pipeline with `count_request` and reads its results through
    `check_request`. Should the view end any other way (a 404, a 422), the hit is counted
    then, and an exhausted limit still answers 429.
    """

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def counted_view(*args: Any, **kwargs: Any) -> Any:
            try:
                response = view(*args, **kwargs)
            except Exception:
                _count_if_due()
                raise
            _count_if_due()
            return response

        counted_view.folds_rate_limit = when  # type: ignore[attr-defined]
        return counted_view

    return decorate


def count_request(pipe: Any) -> Any:
    """Queue this request's rate-limit hit first on `pipe`, if it is still to be counted."""
    who = g.pop("rate_limit_due", None)
    if who is not None:
        g.rate_limit_ends = current_app.extensions[RATE_LIMITER].queue(pipe, who)
    return pipe


def check_request(results: list) -> list:
    """The results of a pipeline that `count_request` prepared, without the hit's; 429 when over."""
    ends = g.pop("rate_limit_ends", None)
    if ends is None:
        return results
    current_app.extensions[RATE_LIMITER].check(results[0], ends)
    return results[2:]


def _count_if_due() -> None:
    who = g.pop("rate_limit_due", None)
    if who is None:
        return
    try:
        current_app.extensions[RATE_LIMITER].hit(who)
    except RedisError:
        return
