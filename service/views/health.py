"""Liveness and readiness probes."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from redis.exceptions import RedisError

from jobs.connection import eviction_policy
from service.errors import error_response
from service.state import get_state
from service.workers import live_workers

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up. Touches nothing else, so a Redis outage never restarts web processes."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Response:
    """Ready: Redis answers, at least one worker is alive, and search is loaded (SEARCH_WARMUP=1)."""
    state = get_state()
    reasons: list[str] = []
    warnings: list[str] = []
    checks: dict[str, object] = {"search": state.search.status}
    if state.settings.search_warmup and state.search.status != "ready":
        checks["search"] = "warming"
        reasons.append("Search is warming up: the model and the index are loading.")
    try:
        state.redis.ping()
        checks["redis"] = "ok"
    except RedisError as error:
        checks["redis"] = "unreachable"
        reasons.append(f"Redis is unreachable ({type(error).__name__}).")
    else:
        workers = live_workers(state.redis)
        checks["workers"] = len(workers)
        if not workers:
            reasons.append("No worker is alive: jobs would wait in their queues.")
        policy = eviction_policy(state.redis)
        checks["redis_eviction_policy"] = policy
        if policy not in (None, "noeviction"):
            warnings.append(
                f"Redis maxmemory-policy is {policy!r}: under memory pressure it deletes queued jobs. "
                "Set it to 'noeviction'."
            )
    if reasons:
        return error_response(
            503,
            " ".join(reasons),
            code="not_ready",
            details={"reasons": reasons, "checks": checks, "warnings": warnings},
            headers={"Retry-After": "5"},
        )
    return jsonify(status="ready", checks=checks, warnings=warnings)
