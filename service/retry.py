"""Running failed or stopped jobs again: one job, an owner's failed jobs in bulk, or from the dashboard.

Every path resets a job the same way (`reset_for_retry`), so state added to a job later is
cleared in one place. A retried job goes back through RQ's own requeue, which puts a job
with a concurrency limit (its key's fair share, KEY_MAX_ACTIVE) behind that limit again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rq.exceptions import InvalidJobOperation
from rq.job import JobStatus
from rq.registry import FailedJobRegistry

from jobs import callbacks
from jobs.engine.job import Job
from jobs.families import PRIORITIES, queue_name
from jobs.times import parse_iso
from service.state import AppState

RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.STOPPED})
# Job ids read from a failed-jobs registry per round trip while looking for an owner's jobs.
SCAN_PAGE = 500


class NotRetryable(Exception):
    """The job is not failed or stopped, or another request is retrying it already."""


def reset_for_retry(job: Job, pipeline: Any = None) -> None:
    """Clear what the last attempts left (error, progress), restore the job's retries, and
    make its next end a new one for its completion webhook."""
    if pipeline is None:
        with job.connection.pipeline() as pipe:
            reset_for_retry(job, pipe)
            pipe.execute()
        return
    job.meta.pop("progress", None)
    job.meta.pop("error", None)
    job.retries_left = job.meta.get("retries") or None
    job.save(pipeline=pipeline, include_result=False)
    callbacks.reset(pipeline, job)


def retry(job: Job) -> Job:
    """Reset a failed or stopped job and put it back on its queue; NotRetryable otherwise."""
    status = job.get_status(refresh=False)
    if status not in RETRYABLE:
        raise NotRetryable(f"Only failed or stopped jobs can be retried; this one is {status.value}.")
    reset_for_retry(job)
    try:
        return job.requeue()
    except InvalidJobOperation:  # no longer in its failed registry: requeued meanwhile
        raise NotRetryable("The job is being retried already.") from None


@dataclass(frozen=True)
class Filter:
    """Which of an owner's ended jobs a bulk retry takes."""

    status: str = JobStatus.FAILED.value
    type_name: str | None = None
    queue: str | None = None
    since: datetime | None = None


def find_retryable(state: AppState, owner: str, which: Filter, limit: int) -> tuple[list[str], bool]:
    """Ids of up to `limit` of `owner`'s jobs matching `which`, and whether more match.

    Failed and stopped jobs are exactly the jobs in RQ's failed-jobs registries (one per
    queue; jobs leave them when they expire or are requeued), so these are read, not the
    owner's recent-jobs index: that one holds every job the owner made, mostly finished,
    and would need an unbounded scan to find a rare failure. Only the registries of the
    queues the filter allows are read, a page of ids and the few fields needed per round trip.
    """
    found: list[str] = []
    for name in _queues(state, which):
        registry = FailedJobRegistry(name, connection=state.redis, job_class=Job)
        start = 0
        while True:
            ids = [i.decode() for i in state.redis.zrange(registry.key, start, start + SCAN_PAGE - 1)]
            if not ids:
                break
            with state.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(Job.key_for(job_id), "meta", "status", "ended_at")
                rows = pipe.execute()
            for job_id, row in zip(ids, rows, strict=True):
                if _matches(row, owner, which):
                    found.append(job_id)
                    if len(found) > limit:
                        return found[:limit], True
            start += SCAN_PAGE
    return found, False


def retry_many(state: AppState, job_ids: list[str]) -> list[str]:
    """Retry each job; the ids of those requeued (one retried meanwhile by another request is not)."""
    retried = []
    for job in Job.fetch_many(job_ids, connection=state.redis):
        if job is None:  # expired since it was found
            continue
        try:
            retry(job)
        except NotRetryable:
            continue
        retried.append(job.id)
    return retried


def _queues(state: AppState, which: Filter) -> list[str]:
    if which.type_name is not None:
        families = [state.job_types[which.type_name].family]
    else:
        families = sorted({job_type.family for job_type in state.job_types.values()})
    names = [queue_name(family, priority) for family in families for priority in PRIORITIES]
    return [name for name in names if name in state.queues and which.queue in (None, name)]


def _matches(row: list[bytes | None], owner: str, which: Filter) -> bool:
    raw_meta, status, ended_at = row
    if raw_meta is None or status is None or status.decode() != which.status:
        return False
    try:
        meta = json.loads(raw_meta)
    except ValueError:
        return False
    if not isinstance(meta, dict) or meta.get("owner") != owner:
        return False
    if which.type_name is not None and meta.get("type") != which.type_name:
        return False
    return which.since is None or (bool(ended_at) and parse_iso(ended_at.decode()) >= which.since)
