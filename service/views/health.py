"""Liveness and readiness probes."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from redis.exceptions import RedisError

from jobs.connection import eviction_policy
from jobs.families import EMBED, GENERAL, family_queues
from service.errors import error_response
from service.state import get_state
from service.workers import live_worker_queues

bp = Blueprint("health", __name__)

# The Procfile's process types that run jobs, and the queues that say a worker is one of them.
PROCESS_TYPES = {"workers": ("worker", GENERAL), "embedders": ("embedder", EMBED)}


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up. Touches nothing else, so a Redis outage never restarts web processes."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Response:
    """Ready to serve: Redis answers and, with SEARCH_WARMUP=1, search is loaded.

    Workers and embedders are counted and their absence is a warning, not a 503: they are
    other process types, and a web process taken out of rotation because a worker dyno
    restarts would refuse the very submissions that wait for it.
    """
    state = get_state()
    reasons: list[str] = []
    warnings: list[str] = []
    checks: dict[str, object] = {"redis": "ok", "redis_eviction_policy": None}
    if state.search.status == "ready":
        checks["search"] = "ready"
    elif state.settings.search_warmup:
        checks["search"] = "warming"
        reasons.append("Search is warming up: the model and the index are loading.")
    else:
        checks["search"] = "off"  # SEARCH_WARMUP=0: loaded by the first search
    try:
        state.redis.ping()
        workers = live_worker_queues(state.redis)
        policy = eviction_policy(state.redis)
    except RedisError as error:
        checks.update(redis="unreachable", workers=None, embedders=None)
        reasons.append(f"Redis is unreachable ({type(error).__name__}).")
    else:
        checks["redis_eviction_policy"] = policy
        if policy not in (None, "noeviction"):
            warnings.append(
                f"Redis maxmemory-policy is {policy!r}: under memory pressure it deletes queued jobs. "
                "Set it to 'noeviction'."
            )
        for check, (process_type, family) in PROCESS_TYPES.items():
            queues = set(family_queues(family))
            checks[check] = sum(1 for served in workers.values() if queues.intersection(served))
            if not checks[check]:
                warnings.append(
                    f"No {process_type} process is alive: its jobs ({', '.join(sorted(queues))}) wait in "
                    "their queues until one starts. This process still serves (not a readiness failure)."
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
