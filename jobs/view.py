"""The job view: the JSON a client reads at `GET /jobs/<id>` and a completion webhook receives."""

from __future__ import annotations

from typing import Any

from rq.job import JobStatus
from rq.registry import ScheduledJobRegistry
from rq.results import Result

from jobs.engine.job import TERMINAL_STATUSES, Job
from jobs.times import iso, iso_timestamp

# `job_view`'s default: the job's result has not been read yet.
UNREAD: Any = object()


def job_view(
    job: Job, latest: Result | None = UNREAD, scheduled_for: float | None = UNREAD
) -> dict[str, Any]:
    """The JSON body of `GET /jobs/<id>`; `latest` is the job's latest result and `scheduled_for`
    its score in its queue's ScheduledJobRegistry (None: not there), when already read."""
    status = job.get_status(refresh=False)
    meta = job.meta
    if status != JobStatus.SCHEDULED:
        scheduled_for = None
    elif scheduled_for is UNREAD:
        scheduled_for = job.connection.zscore(scheduled_key(job.origin), job.id)
    return {
        "id": job.id,
        "type": meta.get("type"),
        "status": status.value,
        # The RQ queue the job is on: an embed job submitted with `"queue": "high"` is on `embed-high`.
        "queue": job.origin,
        "progress": meta.get("progress"),
        "result": _return_value(job, latest) if status == JobStatus.FINISHED else None,
        # The latest failed attempt's error, until the job finishes.
        "error": meta.get("error") if status != JobStatus.FINISHED else None,
        "attempts": job.attempts,
        "retries_left": job.retries_left or 0,
        "created_at": iso(job.created_at),
        "enqueued_at": iso(job.enqueued_at),
        "started_at": iso(job.started_at),
        "ended_at": iso(job.ended_at),
        # When a delayed job, or a failed attempt's retry, will be queued to run.
        "scheduled_for": iso_timestamp(scheduled_for),
        # The completion webhook, when the job has a callback_url (jobs.callbacks).
        "callback": _callback(job.callback),
        # The jobs it waits for, when it has any (`depends_on`), and whether it runs even if
        # one of them does not finish.
        **_dependencies(job),
        # Fields particular to the job type (e.g. an embed job's document ids).
        **meta.get("view", {}),
    }


def _dependencies(job: Job) -> dict[str, Any]:
    if not job.depends_on_ids:
        return {}
    return {"depends_on": job.depends_on_ids, "allow_failure": bool(job.allow_dependency_failures)}


def _return_value(job: Job, latest: Result | None) -> Any:
    if latest is UNREAD:
        return job.return_value()
    return latest.return_value if latest is not None and latest.type == Result.Type.SUCCESSFUL else None


def _callback(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {name: state.get(name) for name in ("url", "status", "attempts", "last_error", "delivered_at")}


def scheduled_key(queue: str) -> str:
    """The key of `queue`'s ScheduledJobRegistry, scored by the time each job is due."""
    return ScheduledJobRegistry.key_template.format(queue)


def is_terminal(job: Job) -> bool:
    return job.get_status(refresh=False) in TERMINAL_STATUSES
