"""Reading jobs back: the job view clients see, lookups by id, and the recent-jobs listing."""

from __future__ import annotations

import re
from typing import Any

from rq.exceptions import NoSuchJobError
from rq.job import JobStatus

from jobs import keys
from jobs.engine.job import TERMINAL_STATUSES, Job
from jobs.times import iso
from service.errors import ApiError
from service.requests import log_job
from service.state import AppState

# Job ids are uuid4 hex strings made by `submit`; anything else cannot name a job.
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def load_job(state: AppState, job_id: str, owner: str) -> Job:
    """The job `job_id` if it exists and belongs to `owner`; otherwise 404."""
    if not JOB_ID.match(job_id):
        raise _not_found()
    try:
        job = Job.fetch(job_id, connection=state.redis)
    except NoSuchJobError:
        raise _not_found() from None
    if job.meta.get("owner") != owner:
        raise _not_found()
    log_job(job.id)
    return job


def job_view(job: Job) -> dict[str, Any]:
    """The JSON body of `GET /jobs/<id>`."""
    status = job.get_status(refresh=False)
    meta = job.meta
    return {
        "id": job.id,
        "type": meta.get("type"),
        "status": status.value,
        "queue": meta.get("queue", job.origin),
        "progress": meta.get("progress"),
        "result": job.return_value() if status == JobStatus.FINISHED else None,
        # The latest failed attempt's error, until the job finishes.
        "error": meta.get("error") if status != JobStatus.FINISHED else None,
        "attempts": job.attempts,
        "retries_left": job.retries_left or 0,
        "created_at": iso(job.created_at),
        "enqueued_at": iso(job.enqueued_at),
        "started_at": iso(job.started_at),
        "ended_at": iso(job.ended_at),
        # Fields particular to the job type (e.g. an embed job's document ids).
        **meta.get("view", {}),
    }


def is_terminal(job: Job) -> bool:
    return job.get_status(refresh=False) in TERMINAL_STATUSES


def recent_jobs(state: AppState, owner: str, status: str | None, queue: str | None, limit: int) -> list[Job]:
    """Newest first, filtered; reads the recent-jobs index a page at a time."""
    index = keys.recent_jobs(owner)
    found: list[Job] = []
    page = max(limit, 50)
    start = 0
    # Bounded so a rare status on a busy service cannot turn one request into a scan of everything.
    while len(found) < limit and start < 20 * page:
        ids = [i.decode() for i in state.redis.zrevrange(index, start, start + page - 1)]
        if not ids:
            break
        for job in Job.fetch_many(ids, connection=state.redis):
            if job is None:
                continue
            if status and job.get_status(refresh=False).value != status:
                continue
            if queue and job.meta.get("queue", job.origin) != queue:
                continue
            found.append(job)
            if len(found) == limit:
                break
        start += page
    return found


def _not_found() -> ApiError:
    return ApiError(404, "No such job.")
