"""Reading jobs back: lookups by id and the recent-jobs listing (the view itself: jobs.view)."""

from __future__ import annotations

from rq.exceptions import NoSuchJobError
from rq.job import JobStatus
from rq.results import Result

from jobs import keys
from jobs.engine.job import Job
from jobs.submission import JOB_ID
from jobs.view import scheduled_key
from service.errors import ApiError
from service.requests import log_job
from service.security import check_request, count_request
from service.state import AppState


def load_job(state: AppState, job_id: str, owner: str) -> Job:
    """The job `job_id` if it exists and belongs to `owner`; otherwise 404."""
    if not JOB_ID.fullmatch(job_id):
        raise _not_found()
    try:
        job = Job.fetch(job_id, connection=state.redis)
    except NoSuchJobError:
        raise _not_found() from None
    if job.meta.get("owner") != owner:
        raise _not_found()
    log_job(job.id)
    return job


def load_with_result(state: AppState, job_id: str, owner: str) -> tuple[Job, Result | None]:
    """`load_job`, and the job's latest result, in one round trip (the request's rate-limit hit too).

    When a scheduled job's view is made, it reads when the job is due (a second round trip,
    for those only).
    """
    check_job_id(job_id)
    with state.redis.pipeline(transaction=False) as pipe:
        count_request(pipe)
        pipe.hgetall(Job.key_for(job_id))
        pipe.xrevrange(Result.get_key(job_id), "+", "-", count=1)
        fields, latest = check_request(pipe.execute())
    if not fields:
        raise _not_found()
    job = Job(job_id, connection=state.redis)
    try:
        job.restore(fields)
    except NoSuchJobError:  # a hash without the job's data: not a job
        raise _not_found() from None
    if job.meta.get("owner") != owner:
        raise _not_found()
    log_job(job.id)
    if not latest:
        return job, None
    result_id, payload = latest[0]
    return job, Result.restore(job_id, result_id.decode(), payload, state.redis, serializer=job.serializer)


def check_job_id(job_id: str) -> None:
    """404 for what cannot be a job id, before anything is asked of Redis."""
    if not JOB_ID.fullmatch(job_id):
        raise _not_found()


def recent_jobs(
    state: AppState,
    owner: str,
    status: str | None,
    queue: str | None,
    limit: int,
    type_name: str | None = None,
    schedule: str | None = None,
) -> list[Job]:
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
            if queue and job.origin != queue:
                continue
            if type_name and job.meta.get("type") != type_name:
                continue
            if schedule and job.meta.get("schedule") != schedule:
                continue
            found.append(job)
            if len(found) == limit:
                break
        start += page
    return found


def scheduled_times(state: AppState, jobs: list[Job]) -> dict[str, float | None]:
    """When each scheduled job of `jobs` is due, by id, in one round trip (none for no such job)."""
    scheduled = [job for job in jobs if job.get_status(refresh=False) == JobStatus.SCHEDULED]
    if not scheduled:
        return {}
    with state.redis.pipeline(transaction=False) as pipe:
        for job in scheduled:
            pipe.zscore(scheduled_key(job.origin), job.id)
        return dict(zip((job.id for job in scheduled), pipe.execute(), strict=True))


def _not_found() -> ApiError:
    return ApiError(404, "No such job.")
