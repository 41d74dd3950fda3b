"""The jobs API: submit, read (with long polling), list, cancel and retry jobs."""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from typing import Literal

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation
from rq.job import JobStatus
from rq.results import Result
from rq.utils import utcformat

from jobs import keys, quota
from jobs.engine.job import Job
from jobs.times import now
from jobs.view import UNREAD, is_terminal, job_view
from service.body import query_args, read_json_object, validate
from service.errors import ApiError
from service.jobview import check_job_id, load_job, load_with_result, recent_jobs, scheduled_times
from service.requests import log_job
from service.security import current_owner, folds_rate_limit
from service.state import get_state
from service.submit import check_idempotency_key, submit

bp = Blueprint("jobs", __name__)
log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 60
# How long DELETE waits for a running job's worker to confirm that it stopped it.
STOP_CONFIRM_SECONDS = 5
CANCELABLE = frozenset({JobStatus.QUEUED, JobStatus.RATE_LIMITED, JobStatus.SCHEDULED, JobStatus.DEFERRED})
RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.STOPPED})

Status = Literal[
    "queued", "rate_limited", "started", "finished", "failed", "deferred", "scheduled", "canceled", "stopped"
]
# The RQ queues a job can be on (jobs.families): the job view's `queue` and GET /queues' names.
QueueName = Literal["high", "default", "low", "embed-high", "embed-default", "embed-low"]


class ReadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wait: float = Field(default=0, ge=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False)


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Status | None = None
    queue: QueueName | None = None
    limit: int = Field(default=50, ge=1, le=200)


@bp.post("/jobs/<type_name>")
# With an Idempotency-Key or API keys, the hit goes with the key's claim or the job's place in
# its key's share (jobs.quota); otherwise it is counted before the body is even read, as on
# other routes: there is no round trip to share.
@folds_rate_limit(when=lambda: "Idempotency-Key" in request.headers or bool(get_state().settings.api_keys))
def create_job(type_name: str) -> Response:
    state = get_state()
    job_type = state.job_types.get(type_name)
    if job_type is None:
        raise ApiError(
            404,
            f"Unknown job type {type_name[:100]!r}.",
            code="unknown_job_type",
            details={"known_types": sorted(state.job_types)},
        )
    idempotency_key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    body = read_json_object()
    submission = submit(state, type_name, job_type, body, current_owner(), idempotency_key)
    log_job(submission.job.id)
    log.info("job %s %s", "accepted" if submission.created else "replayed", type_name)
    response = _job_response(submission.job, 202 if submission.created else 200)
    if not submission.created:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("/jobs/<job_id>")
@folds_rate_limit()
def read_job(job_id: str) -> Response:
    state = get_state()
    query = validate(ReadQuery, query_args())
    if query.wait > 0:
        job, latest, scheduled_for = _read_until_end(job_id, query.wait)
    else:
        job, latest, scheduled_for = load_with_result(state, job_id, current_owner())
    return jsonify(job_view(job, latest, scheduled_for))


@bp.get("/jobs")
def list_jobs() -> Response:
    state = get_state()
    query = validate(ListQuery, query_args())
    found = recent_jobs(state, current_owner(), query.status, query.queue, query.limit)
    due = scheduled_times(state, found)
    return jsonify(jobs=[job_view(job, scheduled_for=due.get(job.id)) for job in found])


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    state = get_state()
    job = load_job(state, job_id, current_owner())
    status = job.get_status(refresh=False)
    if is_terminal(job):
        # Every ended state alike, a cancel or stop that already happened included.
        raise ApiError(409, f"The job has already ended ({status.value}); there is nothing to cancel.")
    if status in CANCELABLE:
        canceled = True
        try:
            job.cancel()
        except InvalidJobOperation:  # canceled meanwhile by another request
            canceled = False
        with state.redis.pipeline(transaction=False) as pipe:
            if canceled:  # RQ's cancel leaves ended_at empty
                pipe.hset(job.key, "ended_at", utcformat(now()))
            pipe.expire(job.key, state.settings.result_ttl)
            pipe.publish(keys.JOB_EVENTS_CHANNEL, job.id)
            if job.meta.get(quota.META_FIELD):
                quota.release(pipe, current_owner(), job.id)
            pipe.execute()
        job = load_job(state, job_id, current_owner())
        if job.get_status(refresh=False) == JobStatus.CANCELED:
            return jsonify(job_view(job))
    # Running (or it started while we were canceling): ask its worker to stop it.
    with suppress(InvalidJobOperation):  # between attempts; the view below shows where it is
        send_stop_job_command(state.redis, job.id, serializer=job.serializer)
    job, latest, scheduled_for = _read_until_end(job_id, STOP_CONFIRM_SECONDS)
    return _job_response(job, 200 if is_terminal(job) else 202, latest, scheduled_for)


@bp.post("/jobs/<job_id>/retry")
def retry_job(job_id: str) -> Response:
    state = get_state()
    job = load_job(state, job_id, current_owner())
    status = job.get_status(refresh=False)
    if status not in RETRYABLE:
        raise ApiError(409, f"Only failed or stopped jobs can be retried; this one is {status.value}.")
    job.meta.pop("progress", None)
    job.meta.pop("error", None)
    job.retries_left = job.meta.get("retries") or None
    job.save(include_result=False)
    try:
        job.requeue()
    except InvalidJobOperation:
        raise ApiError(409, "The job is being retried already.") from None
    return _job_response(load_job(state, job_id, current_owner()), 202)


def _read_until_end(job_id: str, seconds: float) -> tuple[Job, Result | None, float | None]:
    """Read the job until it ends or `seconds` pass; read it once when no slot is free."""
    state = get_state()
    owner = current_owner()
    deadline = time.monotonic() + seconds
    check_job_id(job_id)  # before a watch starts the events listener for nothing
    with state.waiter.slot() as may_wait:
        if not may_wait:
            return load_with_result(state, job_id, owner)
        # Watched before the first read, so an end announced right after any read still wakes it.
        with state.waiter.watch(job_id) as ended:
            # The first read leaves the result out: most often the job has not ended yet (if
            # it has, `job_view` reads the result).
            job, latest, scheduled_for = load_with_result(state, job_id, owner, with_result=False)
            while not is_terminal(job):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ended.wait(min(remaining, max(0.1, state.settings.long_poll_recheck)))
                ended.clear()
                job, latest, scheduled_for = load_with_result(state, job_id, owner)
            return job, latest, scheduled_for


def _job_response(
    job: Job, status: int, latest: Result | None = UNREAD, scheduled_for: float | None = UNREAD
) -> Response:
    response = jsonify(job_view(job, latest, scheduled_for))
    response.status_code = status
    response.headers["Location"] = url_for("jobs.read_job", job_id=job.id)
    return response
