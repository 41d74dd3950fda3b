"""Running failed or stopped jobs again: one job, an owner's failed jobs in bulk, or from the dashboard.

Every path resets a job the same way (`reset_for_retry`) and queues it through the engine's
queue, so it waits its key's turn like any new job (jobs.engine.fair). A retry by a key takes a
place in the key's share of Redis (KEY_MAX_WAITING) like a new job does; the dashboard's
requeue, an operator's action, takes none.

Bulk retries read each owner's index of its failed and stopped jobs (kept by the job class as
jobs fail: jobs.engine.job), never another owner's jobs: a key with no failures costs one
empty read, whatever the other keys hold.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rq.job import JobStatus

from jobs import callbacks, keys, quota
from jobs.engine.job import RETRYABLE_INDEXES, Job
from jobs.engine.queue import Queue
from jobs.families import PRIORITIES, queue_name
from service.state import AppState

RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.STOPPED})
# Job ids read from an owner's index per round trip while looking for matching jobs.
SCAN_PAGE = 500


class NotRetryable(Exception):
    """The job is not failed or stopped, or another request is retrying it already."""


def reset_for_retry(job: Job, pipeline: Any) -> None:
    """Clear what the last attempts left (error, progress, times), restore the job's retries,
    and make its next end a new one for its completion webhook and the retry indexes. The job
    itself is written by whoever queues it, in the same transaction."""
    job.meta.pop("progress", None)
    job.meta.pop("error", None)
    job.retries_left = job.meta.get("retries") or None
    job.started_at = job.ended_at = None
    callbacks.reset(pipeline, job)
    pipeline.zrem(keys.stopped(job.origin), job.id)
    if owner := job.meta.get("owner"):
        for status in RETRYABLE_INDEXES:
            pipeline.zrem(keys.retryable(owner, status), job.id)


def retry(job: Job) -> Job:
    """Reset a failed or stopped job and queue it again; NotRetryable otherwise."""
    status = job.get_status(refresh=False)
    if status not in RETRYABLE:
        raise NotRetryable(f"Only failed or stopped jobs can be retried; this one is {status.value}.")
    connection = job.connection
    # Whoever removes it from its failed registry retries it: a second request finds it gone.
    if not connection.zrem(job.failed_job_registry.key, job.id):
        raise NotRetryable("The job is being retried already.")
    queue = Queue(job.origin, connection=connection)
    with connection.pipeline() as pipe:
        queue.enqueue_job(job, pipeline=pipe)  # first: it starts the transaction
        reset_for_retry(job, pipe)
        job.save(pipeline=pipe, include_result=False)
        pipe.persist(job.key)  # its failure gave it an expiry; a queued job waits for its worker
        pipe.execute()
    return job


def reserve_place(state: AppState, job: Job) -> list[int] | None:
    """Take a place for `job` in its key's share of Redis (jobs.quota), as a submission does;
    the reservation's answer ({admitted, jobs waiting, bytes waiting}), None when keys have no
    share (no API_KEYS)."""
    settings = state.settings
    if not settings.api_keys or not job.meta.get(quota.META_FIELD):
        return None
    at = time.time()
    with state.redis.pipeline(transaction=False) as pipe:
        quota.reserve(
            pipe,
            job.meta.get("owner", ""),
            job.id,
            len(job.data or b""),
            now=at,
            lapses_at=at + settings.max_delay + settings.result_ttl,
            jobs=settings.key_max_waiting,
            size_limit=settings.key_max_waiting_mb * 2**20,
        )
        (answer,) = pipe.execute()
    return [int(value) for value in answer]


def release_place(state: AppState, job: Job) -> None:
    with state.redis.pipeline(transaction=False) as pipe:
        quota.release(pipe, job.meta.get("owner", ""), job.id)
        pipe.execute()


@dataclass(frozen=True)
class Filter:
    """Which of an owner's ended jobs a bulk retry takes."""

    status: str = JobStatus.FAILED.value
    type_name: str | None = None
    queue: str | None = None
    since: datetime | None = None


def find_retryable(state: AppState, owner: str, which: Filter, limit: int) -> tuple[list[str], bool]:
    """Ids of up to `limit` of `owner`'s jobs matching `which`, oldest end first, and whether
    more match: from the owner's index of its failed (or stopped) jobs, a page at a time with
    the few fields needed. Entries of jobs that expired or ran again are dropped on the way."""
    index = keys.retryable(owner, which.status)
    queues = _queues(state, which)
    low: float | str = which.since.timestamp() if which.since is not None else "-inf"
    found: list[str] = []
    start = 0
    while True:
        ids = [i.decode() for i in state.redis.zrangebyscore(index, low, "+inf", start=start, num=SCAN_PAGE)]
        if not ids:
            return found, False
        with state.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(Job.key_for(job_id), "meta", "status", "origin")
            rows = pipe.execute()
        gone = [
            job_id
            for job_id, (_, status, _) in zip(ids, rows, strict=True)
            if status != which.status.encode()
        ]
        for job_id, row in zip(ids, rows, strict=True):
            if _matches(row, owner, which, queues):
                found.append(job_id)
                if len(found) > limit:
                    return found[:limit], True
        if gone:
            state.redis.zrem(index, *gone)
        start += SCAN_PAGE - len(gone)


def retry_many(state: AppState, job_ids: list[str]) -> tuple[list[str], list[int] | None]:
    """Retry each job while its key's share has room; the ids of those queued again (one retried
    meanwhile by another request is not), and the share's answer if it refused one."""
    retried = []
    for job in Job.fetch_many(job_ids, connection=state.redis):
        if job is None:  # expired since it was found
            continue
        answer = reserve_place(state, job)
        if answer is not None and not answer[0]:
            return retried, answer
        try:
            retry(job)
        except NotRetryable:
            if answer is not None:
                release_place(state, job)
            continue
        retried.append(job.id)
    return retried, None


def _queues(state: AppState, which: Filter) -> frozenset[str]:
    if which.type_name is not None:
        families = [state.job_types[which.type_name].family]
    else:
        families = sorted({job_type.family for job_type in state.job_types.values()})
    names = [queue_name(family, priority) for family in families for priority in PRIORITIES]
    return frozenset(name for name in names if name in state.queues and which.queue in (None, name))


def _matches(row: list[bytes | None], owner: str, which: Filter, queues: frozenset[str]) -> bool:
    raw_meta, status, origin = row
    if raw_meta is None or status is None or status.decode() != which.status:
        return False
    if origin is None or origin.decode() not in queues:
        return False
    try:
        meta = json.loads(raw_meta)
    except ValueError:
        return False
    if not isinstance(meta, dict) or meta.get("owner") != owner:
        return False
    return which.type_name is None or meta.get("type") == which.type_name
