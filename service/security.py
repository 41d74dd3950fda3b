"""Who may call the API: API keys, the owner of each job, and per-key rate limits."""

from __future__ import annotations

import hashlib
import hmac
import logging

from flask import Flask, g, request
from flask_limiter import Limiter

from service.errors import ApiError
from service.state import AppState

log = logging.getLogger(__name__)

# Blueprints that make up the API; health probes and the dashboard have rules of their own.
API_BLUEPRINTS = frozenset({"jobs", "search"})

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


def init_security(app: Flask, state: AppState) -> Limiter:
    settings = state.settings
    keys = [key.encode() for key in settings.api_keys]
    if not keys:
        log.warning(
            "API_KEYS is not set: the API is open to anyone who can reach this port. "
            "Set API_KEYS before exposing the service."
        )

    @app.before_request
    def authenticate() -> None:
        if request.blueprint not in API_BLUEPRINTS or not keys:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        presented = token.strip().encode()
        # Compare with every key, each in constant time, whatever matches first.
        matched = None
        for key in keys:
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

    limiter = Limiter(
        key_func=lambda: g.get("owner") or request.remote_addr or "unknown",
        app=app,
        storage_uri=settings.redis_client_url,
        # Counters live in the app's Redis, through the app's own connections.
        storage_options={"connection_pool": state.redis.connection_pool},
        strategy="fixed-window",  # one Redis round trip per request
        # One budget per key across every route of the API.
        application_limits=[] if settings.rate_limit.lower() in OFF else [settings.rate_limit],
        application_limits_exempt_when=lambda: request.blueprint not in API_BLUEPRINTS,
        headers_enabled=True,
        swallow_errors=True,  # Redis down: the request goes on and meets the 503 there
    )
    return limiter
