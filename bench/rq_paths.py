"""bench.costs' worker: the engine's Worker, timed path by path, with chosen overrides swapped
back to RQ's own code.

    rq worker-pool ... --worker-class bench.rq_paths.PathWorker   (BENCH_RQ_CODE=heartbeat,start)

BENCH_RQ_CODE names the overrides that run RQ's code instead of the engine's (see `SWAPS`);
BENCH_PATH_STATS names a directory where each process (the worker and its work-horse) writes,
after each job, how often each path ran, its seconds (in all, and job by job) and its Redis
round trips. A round trip
is one request sent on a connection by the worker's main thread: one command, or one
pipeline (redis-py's `send_packed_command`). Threads beside the work loop (the command
listener, webhook sender, schedule ticker, Redis probe) are not counted.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis.connection
from rq import Worker as RQWorker
from rq.executions import Execution
from rq.job import JobStatus
from rq.worker.base import BaseWorker

from jobs import quota
from jobs.engine.job import Job
from jobs.engine.queue import Queue
from jobs.engine.worker import Worker

# Override -> (path, what RQ's code does instead).
SWAPS = {
    "heartbeat": ("take", "RQ's Worker.heartbeat: three commands, a round trip each, at every call"),
    "check_for_suspension": ("take", "RQ's check_for_suspension: a GET before every job"),
    "set_state": ("take", "RQ's set_state: an HSET at every call, changed or not"),
    "start": ("start", "RQ's prepare_execution (worker) + prepare_job_execution (horse), per job"),
    "finish": ("finish", "RQ's _finalize_success: handle_job_success, then the end's announcement"),
}
# Jobs run before the counts start (imports, the first horse, connections).
WARM_UP = 10

_counting = threading.local()
_send = redis.connection.AbstractConnection.send_packed_command


def _counted_send(self: Any, command: Any, check_health: bool = True) -> None:
    for stats in getattr(_counting, "active", ()):
        stats[2] += 1
    return _send(self, command, check_health)


def count_round_trips() -> None:
    """Count what the connections of this process send (inherited by its work-horses)."""
    redis.connection.AbstractConnection.send_packed_command = _counted_send  # type: ignore[method-assign]


class PathStats:
    """Calls, seconds and round trips per path, in this process, written to a file after each job."""

    def __init__(self) -> None:
        directory = os.environ.get("BENCH_PATH_STATS")
        self.directory = Path(directory) if directory else None
        self.reset()

    def reset(self) -> None:
        self.paths: dict[str, list[float]] = {}
        # Each job's seconds on each path (0 where a job did not take it), for medians.
        self.per_job: dict[str, list[float]] = {}
        self.this_job: dict[str, float] = {}
        self.jobs = 0
        self.first = self.last = 0.0

    @contextmanager
    def path(self, name: str) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        stats = self.paths.setdefault(name, [0, 0.0, 0])
        active = getattr(_counting, "active", ())
        if any(each is stats for each in active):  # already inside this path
            yield
            return
        _counting.active = (*active, stats)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            stats[1] += elapsed
            stats[0] += 1
            self.this_job[name] = self.this_job.get(name, 0.0) + elapsed
            _counting.active = active

    def job_done(self, started: float) -> None:
        self.jobs += 1
        self.first = self.first or started
        self.last = time.time()
        for name in self.paths:
            self.per_job.setdefault(name, []).append(self.this_job.get(name, 0.0))
        self.this_job = {}
        if self.jobs == WARM_UP:
            self.reset()
        elif self.directory is not None:
            figures = {"jobs": self.jobs, "first": self.first, "last": self.last}
            (self.directory / f"{os.getpid()}.json").write_text(
                json.dumps({**figures, "paths": self.paths, "per_job": self.per_job})
            )


def _rq_code() -> set[str]:
    swapped = {name for name in os.environ.get("BENCH_RQ_CODE", "").split(",") if name}
    unknown = swapped - set(SWAPS)
    if unknown:
        raise SystemExit(f"BENCH_RQ_CODE: no such override: {', '.join(sorted(unknown))}")
    return swapped


class PathWorker(Worker):
    """The engine's worker, its paths timed; those named in BENCH_RQ_CODE run RQ's code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        count_round_trips()
        super().__init__(*args, **kwargs)
        self.rq_code = _rq_code()
        self.stats = PathStats()

    # The take path: from one job's end to the next one's start, and its parts.
    def dequeue_job_and_maintain_ttl(self, *args: Any, **kwargs: Any) -> Any:
        with self.stats.path("take"):
            return super().dequeue_job_and_maintain_ttl(*args, **kwargs)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:  # part of another path's round trip
            return super().heartbeat(timeout, pipeline)
        with self.stats.path("take"), self.stats.path("heartbeat"):
            if "heartbeat" in self.rq_code:
                return BaseWorker.heartbeat(self, timeout, pipeline)
            return super().heartbeat(timeout, pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        with self.stats.path("take"), self.stats.path("check_for_suspension"):
            if "check_for_suspension" in self.rq_code:
                return BaseWorker.check_for_suspension(self, burst)
            return super().check_for_suspension(burst)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if pipeline is not None:
            return super().set_state(state, pipeline)
        with self.stats.path("take"), self.stats.path("set_state"):
            if "set_state" in self.rq_code:
                return BaseWorker.set_state(self, state, pipeline)
            return super().set_state(state, pipeline)

    def execute_job(self, job: Job, queue: Queue) -> None:
        started = time.time()
        super().execute_job(job, queue)
        self.stats.job_done(started)

    # The start path: marking a job started.
    def _start(self, jobs: list[Job], queue: Queue) -> list[tuple[Job, Execution]]:
        with self.stats.path("start"):
            if "start" not in self.rq_code:
                return super()._start(jobs, queue)
            running = []
            for job in jobs:
                execution = RQWorker.prepare_execution(self, job)
                # What RQ's horse does first, here in the worker (ours starts jobs for the horse).
                BaseWorker.prepare_job_execution(self, job, remove_from_intermediate_queue=True)
                if job.meta.get(quota.META_FIELD):
                    with self.connection.pipeline() as pipe:
                        quota.release(pipe, job.meta.get("owner", ""), job.id)
                        pipe.execute()
                running.append((job, execution))
            return running

    # The finish path, in the work-horse: recording a success.
    def horse_started(self) -> None:
        super().horse_started()
        self.stats = PathStats()  # the horse's own counts, in a file of its own

    def _finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        started = time.time()
        with self.stats.path("finish"):
            if "finish" in self.rq_code:
                BaseWorker._finalize_success(self, job, queue, execution, return_value)
            else:
                super()._finalize_success(job, queue, execution, return_value)
        if job.get_status(refresh=False) == JobStatus.FINISHED:
            self.stats.job_done(started)
