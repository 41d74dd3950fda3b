"""Job metrics kept in Redis, so every process on every machine adds to the same counts.

The web process counts jobs it accepts, workers count jobs that end and how long they ran
and waited; all in Redis hashes, written in the same round trip as the work they describe.
`/metrics` reads them when Prometheus scrapes (service/metrics.py).
"""

from __future__ import annotations

import bisect
from typing import Any

from jobs import keys

# Histogram bucket upper bounds, in seconds (the last bucket, +Inf, is implied).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)

SEPARATOR = "|"


def labels_of(job: Any) -> tuple[str, str]:
    """(type, queue): the queue is the RQ queue the job is on (`embed-default` for an embed job
    asked for `default`), the name the job view, `/queues` and `afterward_queue_depth` use."""
    meta = job.meta or {}
    return meta.get("type") or "unknown", job.origin or meta.get("queue") or "unknown"


def count(pipe: Any, event: str, job_type: str, queue: str) -> None:
    """Add one to `afterward_jobs_<event>_total{type, queue}`."""
    pipe.hincrby(keys.METRICS_COUNTERS, SEPARATOR.join((event, job_type, queue)), 1)


def observe(pipe: Any, histogram: str, job_type: str, queue: str, seconds: float) -> None:
    """Record one observation in a histogram kept as per-bucket counts plus a sum."""
    key = keys.metrics_histogram(histogram)
    bucket = bisect.bisect_left(BUCKETS, seconds)  # len(BUCKETS) means +Inf
    pipe.hincrby(key, SEPARATOR.join((job_type, queue, str(bucket))), 1)
    pipe.hincrbyfloat(key, SEPARATOR.join((job_type, queue, "sum")), seconds)


def record_end(pipe: Any, job: Any, event: str) -> None:
    """A job ended an attempt: count it, and time its run and its wait in the queue."""
    job_type, queue = labels_of(job)
    count(pipe, event, job_type, queue)
    if job.started_at and job.ended_at:
        observe(pipe, "duration", job_type, queue, (job.ended_at - job.started_at).total_seconds())
    if job.enqueued_at and job.started_at:
        observe(pipe, "wait", job_type, queue, max(0.0, (job.started_at - job.enqueued_at).total_seconds()))
