"""Building and writing a job as `POST /jobs/<type>` does: shared by the API's views
(service.submit, service.views) and the schedule ticker (jobs.schedules), which writes each
tick's job the way the API would. A request is validated and turned into a job (`prepare`),
written in a transaction of the caller's making (`enqueue`), and settled after it (`settle`);
with API keys the job first takes its place in its key's share of Redis (`Reservation`)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any

from pydantic import create_model
from rq import Retry
from rq.job import Dependency, JobStatus

from jobs import callbacks, keys, metrics, quota
from jobs.engine import dependencies
from jobs.engine.job import Job
from jobs.engine.queue import Queue
from jobs.families import queue_name
from jobs.refusals import ApiError, validate
from jobs.settings import Settings
from jobs.times import now
from jobs.types.registry import JobType
from jobs.types.schema import OPTION_FIELDS, JobInput, JobOptions, options_model

# Job ids are uuid4 hex strings made by `prepare`; anything else cannot name a job. Always
# `fullmatch`: `$` would also match before a trailing newline.
JOB_ID = re.compile(r"[0-9a-f]{32}")
# One submission in this many trims its owner's recent-jobs index.
TRIM_EVERY = 16


@lru_cache(maxsize=64)
def request_model(type_name: str, job_type: JobType, max_timeout: int, max_delay: int) -> type[JobInput]:
    """The body schema of `POST /jobs/<type_name>`: the type's own fields plus the common options."""
    title = "".join(part.capitalize() for part in type_name.split("_")) + "Request"
    return create_model(title, __base__=(job_type.input, options_model(max_timeout, max_delay)))


@dataclass
class Prepared:
    """A validated request turned into an RQ job, not yet written: `enqueue` writes it."""

    job: Job
    queue: Queue
    type_name: str
    job_type: JobType
    kwargs: dict[str, Any]
    options: JobOptions
    owner: str
    # The request's fields, canonical: equal for equal requests (idempotent replays).
    fingerprint: str


def prepare(
    settings: Settings,
    queues: dict[str, Queue],
    type_name: str,
    job_type: JobType,
    body: dict[str, Any],
    owner: str,
    request_id: str | None = None,
) -> Prepared:
    """Validate `body` as a `POST /jobs/<type_name>` body (an ApiError with a 4xx when it is
    not) and build its job. Nothing is written: a web request, a batch or a schedule's tick
    writes it with `enqueue`, in a transaction of its own making."""
    model = request_model(type_name, job_type, settings.max_job_timeout, settings.max_delay)
    request = validate(model, body, context={"settings": settings})
    # The request model subclasses the type's input and JobOptions: it is both.
    options: JobOptions = request  # type: ignore[assignment]
    fields = request.model_dump(mode="json", exclude=set(OPTION_FIELDS))
    if options.callback_url is not None:
        _check_callback(options.callback_url, settings)
    # Computed before `prepare`, which may add ids or stamps that differ on every call.
    fingerprint = _fingerprint(type_name, request.model_dump(mode="json"))
    kwargs = job_type.prepare(fields) if job_type.prepare else fields
    if job_type.owned:  # e.g. an embed job's documents are its key's
        kwargs = dict(kwargs, owner=owner)

    queue = queues[queue_name(job_type.family, options.queue)]
    depends_on = None
    if options.depends_on:
        ids = list(dict.fromkeys(options.depends_on))  # a repeated id counts once
        check_dependencies(queue.connection, ids, owner)
        depends_on = Dependency(jobs=ids, allow_failure=options.allow_failure)
    retries = options.retries
    meta: dict[str, Any] = {"type": type_name, "owner": owner, "queue": options.queue, "retries": retries}
    if request_id:
        meta["request_id"] = request_id
    if job_type.describe:
        meta["view"] = job_type.describe(kwargs)
    if settings.api_keys:
        meta[quota.META_FIELD] = 1
    job = queue.create_job(
        job_type.path,
        kwargs=kwargs,
        timeout=options.timeout or job_type.timeout_for(request),
        result_ttl=settings.result_ttl,
        failure_ttl=settings.result_ttl,
        job_id=uuid.uuid4().hex,
        meta=meta,
        status=JobStatus.SCHEDULED if options.delay else JobStatus.QUEUED,
        retry=Retry(max=retries, interval=backoff_intervals(settings, retries)) if retries else None,
        # A scheduled job that never ran is gone this long after it was accepted.
        ttl=settings.max_delay + settings.result_ttl if options.delay else None,
        depends_on=depends_on,
    )
    if settings.api_keys:
        # Workers take turns between keys (jobs.engine.fair); a cap, when set, is the job's own.
        job.owner = owner
        job.max_active = settings.key_max_active or None
    return Prepared(job, queue, type_name, job_type, kwargs, options, owner, fingerprint)


def enqueue(pipe: Any, prepared: Prepared, settings: Settings) -> None:
    """Write the prepared job on `pipe` (a transaction): queued, or scheduled when it has a
    delay, with its webhook, its place in its owner's recent jobs and the accepted count."""
    job, options = prepared.job, prepared.options
    if job.depends_on_ids and not pipe.explicit_transaction and not pipe.command_stack:
        # The job is written deferred; `settle` queues it after the transaction if its
        # dependencies have ended meanwhile (jobs.engine.dependencies).
        pipe.multi()
    if options.delay:
        prepared.queue.schedule_job(job, now() + timedelta(seconds=options.delay), pipeline=pipe)
    else:
        prepared.queue.enqueue_job(job, pipeline=pipe)
    if options.callback_url is not None:
        callbacks.register(pipe, job, options.callback_url)
    _index(pipe, prepared.owner, job.id, settings)
    metrics.count(pipe, "accepted", prepared.type_name, prepared.queue.name)


def settle(connection: Any, written: list[Prepared]) -> None:
    """After the transaction that wrote them: queue (or cancel) the jobs with dependencies
    that ended before the transaction did; the jobs show their status as it now is."""
    waiting = [prepared.job for prepared in written if prepared.job.depends_on_ids]
    if not waiting:
        return
    dependencies.settle(connection, [job.id for job in waiting], Job)
    for job in waiting:
        if job.get_status() != JobStatus.DEFERRED:
            job.refresh()


def check_dependencies(connection: Any, job_ids: list[str], owner: str) -> None:
    """422 unless every id names a job of `owner`'s; the same answer for a job that does not
    exist and one of another key (which must not learn that it does)."""
    well_formed = [job_id for job_id in job_ids if JOB_ID.fullmatch(job_id)]
    with connection.pipeline(transaction=False) as pipe:
        for job_id in well_formed:
            pipe.hget(Job.key_for(job_id), "meta")
        metas = dict(zip(well_formed, pipe.execute(), strict=True)) if well_formed else {}
    unknown = [job_id for job_id in job_ids if not _owned_by(metas.get(job_id), owner)]
    if unknown:
        raise ApiError(
            422,
            f"depends_on names no job of yours: {', '.join(unknown[:5])}.",
            code="unknown_dependency",
            details=[
                {"field": "depends_on", "message": f"no such job: {job_id}", "type": "unknown_dependency"}
                for job_id in unknown
            ],
        )


def _owned_by(meta: bytes | None, owner: str) -> bool:
    try:
        return bool(meta) and json.loads(meta).get("owner") == owner
    except (ValueError, AttributeError):
        return False


def share_limits(settings: Settings, at: float) -> dict[str, Any]:
    """The key's share of Redis that a place reserved at `at` counts against (jobs.quota), and
    when that place lapses if nobody releases it."""
    return {
        "now": at,
        "lapses_at": at + settings.max_delay + settings.result_ttl,
        "jobs": settings.key_max_waiting,
        "size_limit": settings.key_max_waiting_mb * 2**20,
    }


@dataclass
class Reservation:
    """A job's place in its key's share of Redis (jobs.quota), reserved in a given pipeline."""

    settings: Settings
    owner: str
    job_id: str
    size: int
    at: float

    def reserve(self, pipe: Any) -> None:
        quota.reserve(
            pipe,
            self.owner,
            self.job_id,
            self.size,
            **share_limits(self.settings, self.at),
        )

    def release(self, pipe: Any) -> None:
        quota.release(pipe, self.owner, self.job_id)


def check_admitted(answer: list, settings: Settings) -> None:
    admitted, waiting, size = (int(value) for value in answer)
    if not admitted:
        raise ApiError(
            429,
            f"This API key already has {waiting} jobs ({size / 2**20:.1f} MB of requests) waiting; "
            f"the limits are {settings.key_max_waiting} jobs and {settings.key_max_waiting_mb} MB. "
            "Submit more as these start.",
            code="quota_exceeded",
            details={"jobs_waiting": waiting, "bytes_waiting": size},
        )


def check_callback_url(url: str, settings: Settings) -> None:
    """A 422 unless `url` may be a callback URL (as a job's `callback_url` is checked)."""
    _check_callback(url, settings)


def _check_callback(url: str, settings: Settings) -> None:
    if not settings.callback_secret:
        raise ApiError(
            422,
            "This server sends no completion webhooks: CALLBACK_SECRET is not set, and a callback "
            "is never sent unsigned. Poll the job instead, or ask the operator to set it.",
            code="callbacks_disabled",
            details=[
                {
                    "field": "callback_url",
                    "message": "CALLBACK_SECRET is not set",
                    "type": "callbacks_disabled",
                }
            ],
        )
    try:
        callbacks.check_at_submit(url, settings)
    except callbacks.CallbackRefused as error:
        raise ApiError(
            422,
            f"The callback_url is refused: {error}.",
            code="callback_url_refused",
            details=[{"field": "callback_url", "message": str(error), "type": "callback_url_refused"}],
        ) from None


def backoff_intervals(settings: Settings, retries: int) -> list[int]:
    """Seconds before each retry: doubling from RETRY_BACKOFF, capped at MAX_RETRY_BACKOFF."""
    return [
        min(settings.retry_backoff * 2**attempt, settings.max_retry_backoff) for attempt in range(retries)
    ]


def _fingerprint(type_name: str, fields: dict[str, Any]) -> str:
    canonical = json.dumps({"type": type_name, "fields": fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _index(pipe: Any, owner: str, job_id: str, settings: Settings) -> None:
    key = keys.recent_jobs(owner)
    created = time.time()
    pipe.zadd(key, {job_id: created})
    # Dropping ids of expired jobs only bounds the index's size (listings skip them anyway), so
    # one submission in TRIM_EVERY does it for its owner rather than every one.
    if random.randrange(TRIM_EVERY) == 0:
        pipe.zremrangebyscore(key, "-inf", created - settings.result_ttl)
