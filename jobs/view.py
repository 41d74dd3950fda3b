"""The job view: the JSON a client reads at `GET /jobs/<id>` and a completion webhook receives."""

from __future__ import annotations

from typing import Any

from rq.job import JobStatus
from rq.results import Result

from jobs.engine.job import TERMINAL_STATUSES, Job
from jobs.times import iso

# `job_view`'s default: the job's result has not been read yet.
UNREAD: Any = object()


def job_view(job: Job, latest: Result | None = UNREAD) -> dict[str, Any]:
    """The JSON body of `GET /jobs/<id>`; `latest` is the job's latest result, when already read."""
    status = job.get_status(refresh=False)
    meta = job.meta
    return {
        "id": job.id,
        "type": meta.get("type"),
        "status": status.value,
        "queue": meta.get("queue", job.origin),
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
        # The completion webhook, when the job has a callback_url (jobs.callbacks).
        "callback": _callback(job.callback),
        # Fields particular to the job type (e.g. an embed job's document ids).
        **meta.get("view", {}),
    }


def _return_value(job: Job, latest: Result | None) -> Any:
    if latest is UNREAD:
        return job.return_value()
    return latest.return_value if latest is not None and latest.type == Result.Type.SUCCESSFUL else None


def _callback(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {name: state.get(name) for name in ("url", "status", "attempts", "last_error", "delivered_at")}


def is_terminal(job: Job) -> bool:
    return job.get_status(refresh=False) in TERMINAL_STATUSES
