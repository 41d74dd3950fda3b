"""Answers that acknowledge a write wait, with REDIS_MIN_REPLICAS, until replicas have it.

A view marked `acknowledges_writes` runs its Redis work on one connection (jobs.replication);
before a 2xx answer leaves, WAIT on that connection must confirm REDIS_MIN_REPLICAS
replicas within REDIS_REPLICA_TIMEOUT_MS. Otherwise the answer is 503 `not_replicated`:
the write reached the primary but may not survive a failover, so its fate is unknown, and
the client retries (a submission with the same Idempotency-Key never makes a second job).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from flask import current_app

from jobs.replication import NotReplicated, pinned
from service.errors import NOT_REPLICATED, REDIS_RETRY_AFTER, RETRY_ADVICE, ApiError
from service.state import get_state

log = logging.getLogger(__name__)


def acknowledges_writes(view: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a view whose 2xx answers acknowledge writes: with REDIS_MIN_REPLICAS, they wait
    for that many replicas to confirm what the view wrote and read; 503 when they do not."""

    @functools.wraps(view)
    def confirmed_view(*args: Any, **kwargs: Any) -> Any:
        state = get_state()
        required = state.settings.redis_min_replicas
        if not required:
            return view(*args, **kwargs)
        timeout_ms = state.settings.redis_replica_timeout_ms
        with pinned(state.redis) as pin:
            response = current_app.make_response(view(*args, **kwargs))
            if 200 <= response.status_code < 300:
                try:
                    pin.confirm(required, timeout_ms)
                except NotReplicated as error:
                    raise not_replicated(error, timeout_ms) from None
        return response

    confirmed_view.acknowledges_writes = True  # type: ignore[attr-defined]
    return confirmed_view


def not_replicated(error: NotReplicated, timeout_ms: int) -> ApiError:
    cause = f" ({error.__cause__})" if error.__cause__ else ""
    log.warning(
        "write not confirmed on %d replica(s) within %d ms: %s%s", error.required, timeout_ms, error, cause
    )
    return ApiError(
        503,
        f"Redis did not confirm this write on {error.required} replica(s) within {timeout_ms} ms "
        f"({error}). {RETRY_ADVICE}",
        code=NOT_REPLICATED,
        details={"replicas_required": error.required, "replicas_confirmed": error.confirmed},
        headers={"Retry-After": str(REDIS_RETRY_AFTER)},
    )
