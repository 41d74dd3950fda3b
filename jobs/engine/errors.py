"""How a job's failure reads in its view: `{"type", "message"}`, never a traceback.

Clients see these, so file paths and Redis details are left out; tracebacks stay in the
worker's log. Every error a job view can show is built here.
"""

from __future__ import annotations

import re

import redis
from rq.job import Job
from rq.timeouts import JobTimeoutException

Error = dict[str, str]


class UnregisteredJobError(Exception):
    """A job names a function (or a callback) that is not a registered job type."""


WORKER_DIED: Error = {
    "type": "WorkerDied",
    "message": "The worker running the job died or lost contact before the job ended.",
}
JOB_STOPPED: Error = {"type": "JobStopped", "message": "The job was stopped by a cancel request."}
WORKER_SHUTDOWN: Error = {
    "type": "WorkerShutdown",
    "message": "The worker shut down while the job ran; it was put back in its queue.",
}

# An absolute file path inside a message (not part of a URL).
_FILE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.+~-]+/)+[\w.+~-]*")


def horse_died(signal_number: int | None) -> Error:
    how = f" (signal {signal_number})" if signal_number else ""
    return {"type": "WorkerDied", "message": f"The process running the job died before the job ended{how}."}


def dependency_failed(dependency_id: str, status: str) -> Error:
    """A job that never ran because a job it depends on did not finish."""
    return {
        "type": "DependencyFailed",
        "message": f"The job was not run: its dependency {dependency_id} ended {status}.",
    }


def timed_out(job: Job) -> Error:
    return {
        "type": "JobTimeout",
        "message": f"The job ran longer than its {job.timeout} s timeout and was stopped.",
    }


def describe_exception(job: Job, exc: BaseException) -> Error:
    """The error of an exception a job (or its callback) raised: type and message."""
    if isinstance(exc, JobTimeoutException):
        return timed_out(job)
    if isinstance(exc, UnregisteredJobError):
        return {"type": "UnregisteredJob", "message": str(exc)}
    if isinstance(exc, redis.exceptions.RedisError):
        return {"type": "StoreError", "message": "The job could not reach the job store."}
    text = str(exc).strip()
    return {"type": type(exc).__name__, "message": plain_message(text) if text else type(exc).__name__}


def from_exc_string(exc_string: str) -> Error:
    """For a failure reported only as RQ's text: its last line, without paths."""
    last_line = exc_string.strip().splitlines()[-1] if exc_string.strip() else ""
    return {"type": "JobFailed", "message": plain_message(last_line)}


def plain_message(message: str) -> str:
    message = _FILE_PATH.sub("<path>", message.strip())
    return message[:1000] or "The job failed."


def record_error(job: Job, error: Error) -> None:
    """Store `error` in the job's meta, keeping what the job saved there meanwhile."""
    job.get_meta(refresh=True)
    job.meta["error"] = error
    job.save_meta()
