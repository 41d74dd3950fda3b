"""The jobs API: submit, read (with long polling), list, cancel and retry jobs."""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, Literal

import redis
from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation
from rq.job import JobStatus
from rq.results import Result
from rq.utils import utcformat

from jobs import callbacks, keys, quota
from jobs.engine.job import Job
from jobs.refusals import validate
from jobs.submission import check_admitted
from jobs.times import now
from jobs.view import UNREAD, is_terminal, job_view
from service.body import query_args, read_json_object
from service.errors import ApiError
from service.jobview import check_job_id, load_job, load_with_result, recent_jobs, scheduled_times
from service.replication import acknowledges_writes
from service.requests import log_job
from service.retry import (
    RETRYABLE,
    Filter,
    NotRetryable,
    find_retryable,
    release_place,
    reserve_place,
    retry,
    retry_many,
)
from service.security import current_owner, folds_rate_limit
from service.state import get_state
from service.submit import check_idempotency_key, submit

bp = Blueprint("jobs", __name__)
log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 60
# How long DELETE waits for a running job's worker to confirm that it stopped it.
STOP_CONFIRM_SECONDS = 5
CANCELABLE = frozenset({JobStatus.QUEUED, JobStatus.RATE_LIMITED, JobStatus.SCHEDULED, JobStatus.DEFERRED})
# How many jobs one bulk retry requeues, unless it asks for fewer; and at most.
BULK_RETRY_DEFAULT = 100
BULK_RETRY_MAX = 1000
# Longest job type name a filter may give.
MAX_TYPE_NAME = 100

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
    type: str | None = Field(default=None, min_length=1, max_length=MAX_TYPE_NAME)
    limit: int = Field(default=50, ge=1, le=200)
    # Only the jobs this schedule's ticks made (jobs.schedules).
    schedule: str | None = Field(default=None, min_length=1, max_length=64)


class BulkRetry(BaseModel):
    """`POST /jobs/retry` body: which of the caller's ended jobs to run again."""

    model_config = ConfigDict(extra="forbid", strict=True)
    status: Literal["failed", "stopped"] = Field(default="failed", description="Retry jobs in this status.")
    type: str | None = Field(
        default=None, min_length=1, max_length=MAX_TYPE_NAME, description="Only jobs of this type."
    )
    queue: QueueName | None = Field(
        default=None, description="Only jobs on this RQ queue (the job view's `queue`, e.g. `embed-default`)."
    )
    since: datetime | None = Field(
        default=None,
        strict=False,
        description="ISO 8601 time (UTC when it names no offset): only jobs that ended at or after it.",
    )
    limit: int = Field(
        default=BULK_RETRY_DEFAULT,
        ge=1,
        le=BULK_RETRY_MAX,
        description=f"Most jobs to retry (default {BULK_RETRY_DEFAULT}); `more` says whether others match.",
    )

    @field_validator("since", mode="before")
    @classmethod
    def _since_is_text(cls, value: Any) -> Any:
        # Lax datetime parsing would also take a number as a Unix time; the API speaks ISO 8601.
        if value is not None and not isinstance(value, str):
            raise ValueError("since must be an ISO 8601 time, e.g. 2026-11-29T08:00:00Z")
        return value

    @field_validator("since")
    @classmethod
    def _since_in_utc(cls, value: datetime | None) -> datetime | None:
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)

    @field_validator("type")
    @classmethod
    def _type_is_known(cls, value: str | None, info: ValidationInfo) -> str | None:
        known = (info.context or {}).get("job_types")
        if value is not None and known is not None and value not in known:
            raise ValueError(f"unknown job type; the types are {', '.join(sorted(known))}")
        return value


class BulkRetried(BaseModel):
    """`POST /jobs/retry` answer."""

    retried: int = Field(ge=0, description="How many jobs were queued again.")
    job_ids: list[str] = Field(description="Their ids.")
    more: bool = Field(description="More jobs match than `limit`: send the request again for them.")


@bp.post("/jobs/<type_name>")
# With an Idempotency-Key or API keys, the hit goes with the key's claim or the job's place in
# its key's share (jobs.quota); otherwise it is counted before the body is even read, as on
# other routes: there is no round trip to share.
@folds_rate_limit(when=lambda: "Idempotency-Key" in request.headers or bool(get_state().settings.api_keys))
@acknowledges_writes
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
        job, latest = _read_until_end(job_id, query.wait)
    else:
        job, latest = load_with_result(state, job_id, current_owner())
    return jsonify(job_view(job, latest))


@bp.get("/jobs")
def list_jobs() -> Response:
    state = get_state()
    query = validate(ListQuery, query_args())
    found = recent_jobs(
        state, current_owner(), query.status, query.queue, query.limit, query.type, query.schedule
    )
    due = scheduled_times(state, found)
    return jsonify(jobs=[job_view(job, scheduled_for=due.get(job.id)) for job in found])


@bp.delete("/jobs/<job_id>")
@acknowledges_writes
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
            callbacks.due(pipe, job)
            pipe.execute()
        job = load_job(state, job_id, current_owner())
        if job.get_status(refresh=False) == JobStatus.CANCELED:
            return jsonify(job_view(job))
    # Running (or it started while we were canceling): ask its worker to stop it.
    with suppress(InvalidJobOperation):  # between attempts; the view below shows where it is
        send_stop_job_command(state.redis, job.id, serializer=job.serializer)
    job, latest = _read_until_end(job_id, STOP_CONFIRM_SECONDS)
    return _job_response(job, 200 if is_terminal(job) else 202, latest)


@bp.post("/jobs/<job_id>/retry")
@acknowledges_writes
def retry_job(job_id: str) -> Response:
    state = get_state()
    job = load_job(state, job_id, current_owner())
    if job.get_status(refresh=False) not in RETRYABLE:
        raise ApiError(
            409, f"Only failed or stopped jobs can be retried; this one is {job.get_status().value}."
        )
    # The job waits again, so it takes a place in its key's share, as a new job would.
    answer = reserve_place(state, job)
    if answer is not None:
        check_admitted(answer, state.settings)
    try:
        retry(job)
    except NotRetryable as error:
        if answer is not None:
            release_place(state, job)
        raise ApiError(409, str(error)) from None
    return _job_response(load_job(state, job_id, current_owner()), 202)


@bp.post("/jobs/retry")
@acknowledges_writes
def retry_jobs() -> Response:
    """Run the caller's failed (or stopped) jobs again, filtered by type, queue and end time."""
    state = get_state()
    body = validate(BulkRetry, read_json_object(), context={"job_types": state.job_types})
    which = Filter(status=body.status, type_name=body.type, queue=body.queue, since=body.since)
    found, more = find_retryable(state, current_owner(), which, body.limit)
    retried, refused = retry_many(state, found)
    log.info("bulk retry: %d of %d found jobs requeued", len(retried), len(found))
    if refused is not None:
        if not retried:
            check_admitted(refused, state.settings)  # 429: the key's share is full
        more = True  # the rest wait for room in the key's share
    response = jsonify(BulkRetried(retried=len(retried), job_ids=retried, more=more).model_dump())
    response.status_code = 202 if retried else 200  # nothing was queued when nothing matched
    return response


def _read_until_end(job_id: str, seconds: float) -> tuple[Job, Result | None]:
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
            # The first read takes the result too: a job that has already ended is answered
            # from this one round trip, and one still running costs an empty XREVRANGE.
            job, latest = load_with_result(state, job_id, owner)
            lost: redis.exceptions.RedisError | None = None
            while lost or not is_terminal(job):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ended.wait(min(remaining, max(0.1, state.settings.long_poll_recheck)))
                ended.clear()
                # A wait rides out Redis going away (a restart, a failover to a replica) until
                # its deadline; only a read failing at the deadline answers 503.
                try:
                    job, latest = load_with_result(state, job_id, owner)
                    lost = None
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
                    lost = error
            if lost:
                job, latest = load_with_result(state, job_id, owner)
            return job, latest


def _job_response(job: Job, status: int, latest: Result | None = UNREAD) -> Response:
    response = jsonify(job_view(job, latest))
    response.status_code = status
    response.headers["Location"] = url_for("jobs.read_job", job_id=job.id)
    return response
