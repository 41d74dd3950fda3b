"""Request ids: accepted from X-Request-ID (or made up), returned, and carried by every log event."""

from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g, request

from jobs import logs

HEADER = "X-Request-ID"
# What a client-chosen request id may look like; anything else is replaced, not echoed.
# Always `fullmatch`: `$` would also match before a trailing newline.
ACCEPTABLE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def current_request_id() -> str | None:
    return g.get("request_id")


def init_request_ids(app: Flask) -> None:
    @app.before_request
    def assign() -> None:
        given = request.headers.get(HEADER, "")
        g.request_id = given if ACCEPTABLE.fullmatch(given) else uuid.uuid4().hex
        g.log_token = logs.request_id.set(g.request_id)

    @app.after_request
    def reply(response: Response) -> Response:
        if "request_id" in g:
            response.headers[HEADER] = g.request_id
        return response

    @app.teardown_request
    def forget(_: BaseException | None) -> None:
        token = g.pop("log_token", None)
        if token is not None:
            logs.request_id.reset(token)
        job_token = g.pop("job_log_token", None)
        if job_token is not None:
            logs.job_id.reset(job_token)


def log_job(job_id: str) -> None:
    """Log events of the rest of this request carry `job_id`."""
    if "job_log_token" not in g:
        g.job_log_token = logs.job_id.set(job_id)
