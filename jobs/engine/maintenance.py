"""Keeping a worker known to be alive, and its queues in order: the worker's heartbeats (at
most one round trip a second, and one for all the jobs it runs), the maintenance round, and
RQ's scheduler process. A part of jobs.engine.worker.Worker, which holds the state these
methods use (see its `__init__`).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import redis
from rq.executions import Execution
from rq.scheduler import RQScheduler
from rq.utils import current_timestamp
from rq.worker import WorkerStatus

from jobs import batches
from jobs.connection import Outage, process_outage
from jobs.engine.horse import (
    die_with_parent,
)
from jobs.engine.job import Job
from jobs.engine.queue import Queue
from jobs.settings import get_settings
from jobs.times import now

log = logging.getLogger(__name__)


class Maintenance:
    """The Worker's heartbeats and maintenance (mixed into jobs.engine.worker.Worker)."""

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's worker heartbeat, at most once a second on its own, in one round trip.

        RQ beats before and after every dequeue and after every job, three commands and three
        round trips each time, for a hash that lives for minutes. A beat is skipped when one
        less than a second ago already keeps the hash alive at least as long.
        """
        timeout = timeout or self.worker_ttl + 60
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
        elif self._beat_due(timeout):
            with self.connection.pipeline(transaction=False) as pipe:
                super().heartbeat(timeout, pipeline=pipe)
                pipe.execute()
            self._outage.up()
        else:
            return
        self._beat_at, self._beat_until = time.monotonic(), time.monotonic() + timeout

    def _beat_due(self, timeout: int | None = None) -> bool:
        now_ = time.monotonic()
        return now_ - self._beat_at >= 1 or self._beat_until < now_ + (timeout or self.worker_ttl + 60) - 1

    def check_for_suspension(self, burst: bool) -> None:
        # RQ looks (with a heartbeat, one round trip) before every job: once a second will do.
        if time.monotonic() - self._suspension_checked_at >= 1:
            super().check_for_suspension(burst)
            self._suspension_checked_at = time.monotonic()

    def set_state(self, state: str, pipeline: Any = None) -> None:
        # RQ sets IDLE both after a job and before each dequeue: write only a change, and IDLE
        # only once the worker finds no job and waits (write_idle, in that wait's round trip):
        # a worker that takes its next job at once goes from busy to busy.
        if pipeline is None and state == WorkerStatus.IDLE and state != self.get_state():
            self._idle_unwritten = True
            return
        if pipeline is None and state == self.get_state():
            return
        self._idle_unwritten = False
        super().set_state(state, pipeline=pipeline)

    def write_idle(self, pipeline: Any) -> None:
        """Add the IDLE state the worker has not written yet to `pipeline` (the dequeue calls
        it as it starts waiting for work: jobs.engine.queue.Queue.before_wait)."""
        if self._idle_unwritten:
            self._idle_unwritten = False
            super().set_state(WorkerStatus.IDLE, pipeline=pipeline)

    @property
    def dequeue_timeout(self) -> int:
        # Wake up for maintenance (job recovery) even when no job comes, and heartbeat as often
        # as a busy worker does: a worker silent longer than a job's heartbeat is dead
        # (service.workers.is_live).
        beat = get_settings().job_monitoring_interval
        return max(1, min(self.worker_ttl - 15, self.maintenance_interval, beat))

    def _heartbeat_all(self, running: list[tuple[Job, Execution]]) -> None:
        """RQ's `maintain_heartbeats` for every running job, in one round trip."""
        worker_ttl = self.job_monitoring_interval + 60
        ttl = self.settings.heartbeat_ttl
        with self.connection.pipeline() as pipe:
            self.heartbeat(worker_ttl, pipeline=pipe)
            positions = []
            for job, execution in running:
                execution.heartbeat(job.started_job_registry, ttl, pipeline=pipe)
                positions.append(len(pipe))
                job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
            results = pipe.execute()
            # A job deleted as it finished (result_ttl=0) must not come back as a husk holding
            # only `last_heartbeat` (rq/rq#1450); a worker hash that expired is written again.
            for position, (job, _) in zip(positions, running, strict=True):
                if results[position] == 1:
                    pipe.delete(job.key)
            if results[0] == 1:
                pipe.hset(self.key, mapping=self.serialize())
                pipe.expire(self.key, worker_ttl)
            pipe.execute()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # A job whose worker stops heartbeating is abandoned after this long (RQ allows 60 s
        # more); the maintenance round then retries or fails it. See README, guarantees.
        return self.settings.heartbeat_ttl

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        # After abandoned jobs are failed: batches whose last end no one announced (jobs.batches).
        try:
            batches.sweep(self.connection)
        except redis.exceptions.RedisError:
            pass  # the work loop says when Redis is away; the next round looks again
        except Exception:
            log.exception("could not sweep open batches")

    def _start_scheduler(
        self, burst: bool = False, logging_level: str | None = "INFO", *args: Any, **kwargs: Any
    ) -> None:
        """RQ's, with a scheduler that stops quietly when Redis goes away (its worker says so,
        once, and starts a new scheduler in its first maintenance round once Redis answers)."""
        self.scheduler = Scheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            serializer=self.serializer,
        )
        self.scheduler.acquire_locks()
        if not self.scheduler.acquired_locks:
            return
        if burst:
            try:
                self.scheduler.register_birth()
                self.scheduler.enqueue_scheduled_jobs()
            finally:
                self.scheduler.release_locks()
                self.scheduler.register_death()
        else:
            self.scheduler.start()


class Scheduler(RQScheduler):
    """RQ's scheduler process, which dies with its worker, ends without a traceback when Redis
    goes away, and queues due jobs through the engine's queues (fair share, wake-up signal)."""

    def start(self) -> Any:
        self._worker_pid = os.getpid()
        return super().start()

    def work(self) -> None:
        # A worker killed outright (SIGKILL, OOM) cannot stop its scheduler: the kernel does,
        # with SIGTERM, which RQ's scheduler answers by releasing its locks and exiting.
        die_with_parent(self._worker_pid, signal.SIGTERM)
        process_outage().muted = True  # its worker says when Redis is away, once
        try:
            super().work()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            self.log.info(
                "scheduler %s: Redis is unreachable; it stops, and its worker starts another", os.getpid()
            )

    def enqueue_scheduled_jobs(self) -> None:
        """RQ's, with each due job queued by the engine's Queue: RQ's scheduler pushes onto
        the queue list itself, past the fair share and without a wake-up signal."""
        self._status = self.Status.WORKING
        if not self._scheduled_job_registries and self.acquired_locks:
            self.prepare_registries()
        for registry in self._scheduled_job_registries:
            job_ids = registry.get_jobs_to_schedule(current_timestamp())
            if not job_ids:
                continue
            queue = Queue(registry.name, connection=self.connection)
            jobs = Job.fetch_many(job_ids, connection=self.connection)
            with self.connection.pipeline() as pipe:
                for job_id, job in zip(job_ids, jobs, strict=True):
                    if job is not None:
                        job.rate_limit_key = None  # RQ's cap, on a job of an earlier release
                        queue.enqueue_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
                    registry.remove(job_id, pipeline=pipe)
                pipe.execute()
        self._status = self.Status.STARTED


class OneLineOutages(logging.Filter):
    """Turns RQ's "could not connect to Redis" lines, one per retry, into the outage's one line."""

    def __init__(self, outage: Outage) -> None:
        super().__init__()
        self.outage = outage

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "could not connect to Redis" in record.msg:
            args = record.args if isinstance(record.args, tuple) else ()
            error = next((arg for arg in args if isinstance(arg, BaseException)), None)
            self.outage.down(error or redis.exceptions.ConnectionError(record.getMessage()))
            return False
        return True
