"""One JSON error shape for every error the API returns: {"error": {"code", "message", "details"?}}."""

from __future__ import annotations

import logging
import re
from contextlib import suppress
from typing import Any

import redis
from flask import Flask, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException

from jobs.refusals import CODES, ApiError
from service.state import get_state

log = logging.getLogger(__name__)

# Seconds a client should wait before trying again when Redis is unreachable.
REDIS_RETRY_AFTER = 5

# A write Redis did not confirm on REDIS_MIN_REPLICAS replicas (service.replication), or one
# the primary refused for want of replicas (its min-replicas-to-write): 503 with this code.
NOT_REPLICATED = "not_replicated"
RETRY_ADVICE = (
    "It may or may not have been applied. Retrying is safe: a submission repeated with the same "
    "Idempotency-Key never makes a second job, and a repeated cancel, retry or delete finds its "
    "work done or does it."
)
# Redis's refusal under min-replicas-to-write, however it is wrapped (pipeline, Lua script).
_NO_REPLICAS = re.compile(r"(^|[\s:-])NOREPLICAS Not enough good replicas")
# A node that was the primary and is now a replica (a failover behind a DNS name or a proxy;
# behind a Sentinel URL the connection moves to the new primary by itself: jobs.sentinel).
_READ_ONLY = re.compile(r"(^|[\s:-])READONLY You can't write against a read only replica")


def error_response(
    status: int, message: str, code: str | None = None, details: Any = None, headers: dict | None = None
) -> Response:
    body: dict[str, Any] = {"code": code or CODES.get(status, "error"), "message": message}
    if details is not None:
        body["details"] = details
    response = jsonify(error=body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def handle_api_error(error: ApiError) -> Response:
        return error_response(error.status, error.message, error.code, error.details, error.headers)

    @app.errorhandler(HTTPException)
    def handle_http_exception(error: HTTPException) -> Response:
        status = error.code or 500
        headers = {}
        if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
        return error_response(status, _plain_message(error), headers=headers)

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    @app.errorhandler(redis.exceptions.BusyLoadingError)
    def handle_redis_down(error: Exception) -> Response:
        log.warning("Redis unavailable: %s", error)
        return error_response(
            503,
            "The job store is unreachable; try again shortly.",
            code="redis_unavailable",
            headers={"Retry-After": str(REDIS_RETRY_AFTER)},
        )

    @app.errorhandler(redis.exceptions.ResponseError)
    def handle_redis_refusal(error: redis.exceptions.ResponseError) -> Response:
        if _READ_ONLY.search(str(error)):
            # Idle connections may all lead to the demoted node: the next ones connect afresh.
            with suppress(Exception):
                get_state().redis.connection_pool.disconnect(inuse_connections=False)
            return handle_redis_down(error)
        if not _NO_REPLICAS.search(str(error)):
            return handle_unexpected(error)
        log.warning("Redis refuses writes: %s", error)
        return error_response(
            503,
            "Redis refuses writes for now: its primary has fewer connected replicas than its "
            f"min-replicas-to-write. {RETRY_ADVICE}",
            code=NOT_REPLICATED,
            headers={"Retry-After": str(REDIS_RETRY_AFTER)},
        )

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception) -> Response:
        # The traceback goes to the log, never to the client.
        log.exception("unhandled error")
        return error_response(500, "Internal error; it has been logged.")


def _plain_message(error: HTTPException) -> str:
    messages = {
        404: "No such resource.",
        405: "Method not allowed on this resource.",
        413: f"Request body is larger than the limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes.",
        429: f"Too many requests: the limit is {error.description}. Retry after the time in Retry-After.",
    }
    return messages.get(error.code or 0) or (error.description or error.name)
