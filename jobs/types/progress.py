"""Progress reporting from inside a running job."""

from __future__ import annotations

from rq import get_current_job


def report_progress(percent: float, message: str = "") -> None:
    """Record how far the current job has come; `GET /jobs/<id>` shows it at once.

    Outside a worker (a plain function call, a unit test) this does nothing.
    """
    job = get_current_job()
    if job is None:
        return
    percent = min(100.0, max(0.0, float(percent)))
    job.meta["progress"] = {"percent": round(percent, 1), "message": message}
    job.save_meta()
