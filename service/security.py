"""Who may call the API: API keys, the owner of each job, and per-key rate limits.

Rate limits use `limits` (the library under Flask-Limiter) directly: one fixed-window counter
per key in Redis, one round trip a request, shared by every web process.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time

from flask import Flask, g, request
from limits import parse as parse_limit
from limits.storage import RedisStorage
from limits.strategies import FixedWindowRateLimiter
from redis.exceptions import RedisError

from jobs import keys
from service.errors import ApiError
from service.state import AppState

log = logging.getLogger(__name__)

# Blueprints that make up the API; health probes and the dashboard have rules of their own.
API_BLUEPRINTS = frozenset({"jobs", "search"})
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


def init_security(app: Flask, state: AppState) -> None:
    settings = state.settings
    api_keys = [key.encode() for key in settings.api_keys]
    if not api_keys:
        log.warning(
            "API_KEYS is not set: the API is open to anyone who can reach this port. "
            "Set API_KEYS before exposing the service."
        )

    @app.before_request
    def authenticate() -> None:
        if request.blueprint not in KEYED_BLUEPRINTS or not api_keys:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        presented = token.strip().encode()
        # Compare with every key, each in constant time, whatever matches first.
        matched = None
        for key in api_keys:
            if hmac.compare_digest(presented, key):
                matched = key
        if scheme.lower() != "bearer" or matched is None:
            raise ApiError(
                401,
                "Send a valid API key as 'Authorization: Bearer <key>'.",
                code="unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="afterward"'},
            )
        g.owner = key_owner(matched.decode())

    limit = None if settings.rate_limit.lower() in OFF else parse_limit(settings.rate_limit)
    if limit is not None:
        storage = RedisStorage(
            settings.redis_client_url,
            # Counters live in the app's Redis, through the app's own connections.
            connection_pool=state.redis.connection_pool,
            key_prefix=keys.RATE_LIMITS,
        )
        limiter = FixedWindowRateLimiter(storage)  # one round trip a request

        @app.before_request
        def rate_limit() -> None:
            if request.blueprint not in API_BLUEPRINTS:
                return
            who = g.get("owner") or request.remote_addr or "unknown"
            try:
                allowed = limiter.hit(limit, who)
            except RedisError:
                return  # Redis down: the request goes on and meets the 503 there
            if not allowed:
                reset = limiter.get_window_stats(limit, who).reset_time
                raise ApiError(
                    429,
                    f"Too many requests: the limit is {limit}. Retry after the time in Retry-After.",
                    code="too_many_requests",
                    headers={"Retry-After": str(max(1, math.ceil(reset - time.time())))},
                )
