"""The RQ worker class Afterward's workers run; see the Procfile's `worker:` line.

rq worker-pool high default low -n 2 -w jobs.engine.worker.Worker -j jobs.engine.job.Job -S json
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import time
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Worker as ForkingWorker
from rq.exceptions import AbandonedJobError, InvalidJobOperation
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.queue import Queue as RQQueue
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import WorkerStatus
from rq.worker.base import logger

from jobs import keys, logs, metrics
from jobs.connection import warn_if_evicting
from jobs.engine.horse import DONE, RETIRING, Horse, Order, read_orders
from jobs.engine.job import Job, UnregisteredJobError
from jobs.engine.queue import Queue, recover_intermediate
from jobs.settings import get_settings

log = logging.getLogger(__name__)


class Worker(ForkingWorker):
    """RQ's forking worker with Afterward's job and queue classes, error reports and a hard timeout.

    Each job runs in a forked work-horse, so a job that crashes, leaks or hangs in C code
    cannot take the worker down, a timeout always ends it, and a cancel request kills it.
    """

    queue_class = Queue

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        # Whatever the command line says: JSON jobs of our class, from queues of our class.
        kwargs.update(serializer=JSONSerializer, job_class=Job, queue_class=Queue)
        queues = [queues] if isinstance(queues, str | RQQueue) else list(queues)
        connection = kwargs.get("connection") or queues[0].connection
        kwargs["connection"] = connection
        names = [q.name if isinstance(q, RQQueue) else q for q in queues]
        super().__init__([Queue(name, connection=connection) for name in names], *args, **kwargs)

        settings = get_settings()
        self.default_result_ttl = settings.result_ttl
        self.job_monitoring_interval = settings.job_monitoring_interval
        self.maintenance_interval = settings.maintenance_interval
        self.timeout_grace = settings.timeout_grace
        self.intermediate_grace = settings.intermediate_grace
        self.shutdown_grace = settings.shutdown_grace
        self._job_errors: dict[str, dict[str, str]] = {}
        self._timed_out_job_id: str | None = None
        self._interrupted_job_id: str | None = None
        self._shutdown_deadline: float | None = None
        self._horse: Horse | None = None
        self.horse_max_jobs = settings.horse_max_jobs
        self.push_exc_handler(self._remember_error)
        warn_if_evicting(self.connection)

    # ------------------------------------------------------------------ taking jobs

    @property
    def dequeue_timeout(self) -> int:
        # Wake up for maintenance (job recovery) even when no job comes.
        return max(1, min(self.worker_ttl - 15, self.maintenance_interval))

    def execute_job(self, job: Job, queue: Queue) -> None:
        # A cancel can land just before the dequeue read the job; honour it (the status was
        # read with the job itself, so this costs no extra round trip).
        if job.get_status(refresh=False) == JobStatus.CANCELED:
            log.info("job %s was canceled before it started; skipping it", job.id)
            self.connection.lrem(queue.intermediate_queue_key, 1, job.id)
            return
        with logs.context(job=job.id, request=job.meta.get("request_id")):
            self._execute(job, queue)

    def _execute(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        order = Order(job.id, queue.name, execution.id, execution.created_at.timestamp())
        horse = self._horse if self._horse is not None else self._spawn_horse()
        if not horse.send(order):  # it retired, or died while idle
            self._bury_horse()
            horse = self._spawn_horse()
            horse.send(order)
        self._monitor(job, queue, horse)
        self.set_state(WorkerStatus.IDLE)

    # ------------------------------------------------------------------ the long-lived work-horse

    @property
    def horse_pid(self) -> int:
        return self._horse.pid if self._horse is not None else 0

    def _spawn_horse(self) -> Horse:
        self._horse = Horse(self._horse_main)
        self.procline(f"Horse {self._horse.pid} ready")
        return self._horse

    def _bury_horse(self) -> int | None:
        status = self._horse.reap() if self._horse is not None else None
        self._horse = None
        return status

    def _monitor(self, job: Job, queue: Queue, horse: Horse) -> None:
        """Wait for the horse to report the job done, heartbeating; handle its death."""
        job.started_at = now()
        while True:
            report = horse.wait_report(timeout=self.job_monitoring_interval)
            if report == DONE:
                break
            if report == RETIRING:
                self._bury_horse()
                break
            if report is None:  # still running
                self.set_current_job_working_time((now() - job.started_at).total_seconds())
                self.maintain_heartbeats(job)
                continue
            # The horse died: killed on purpose (timeout, cancel, shutdown) or crashed.
            status = self._bury_horse()
            self.set_current_job_working_time(0)
            self._handle_horse_death(job, queue, status)
            return
        self.set_current_job_working_time(0)

    def _handle_horse_death(self, job: Job, queue: Queue, status: int | None) -> None:
        try:
            job_status = job.get_status()
        except InvalidJobOperation:
            return  # the job ended and expired meanwhile
        if self._stopped_job_id == job.id:
            log.warning("job %s stopped on request", job.id)
            self.handle_job_failure(
                job, queue=queue, exc_string="Job stopped by user, work-horse terminated."
            )
        elif job_status not in (JobStatus.FINISHED, JobStatus.FAILED):
            job.ended_at = now()
            signal_note = f" (signal {os.WTERMSIG(status)})" if status and os.WIFSIGNALED(status) else ""
            exc_string = f"Work-horse terminated unexpectedly; waitpid returned {status}{signal_note}; "
            log.warning("job %s failed: %s", job.id, exc_string)
            self.handle_job_failure(job, queue=queue, exc_string=exc_string)

    def _horse_main(self, orders_fd: int, reports_fd: int) -> None:
        """The horse: run each job it is sent, report, and retire after `horse_max_jobs`."""
        random.seed()
        self.setup_work_horse_signals()
        self._is_horse = True
        self.log = logger
        self.horse_started()
        orders = os.fdopen(orders_fd, "rb")
        done = 0
        while (order := read_orders(orders)) is not None:
            queue = Queue(order.queue, connection=self.connection)
            execution = Execution(order.execution_id, order.job_id, connection=self.connection)
            execution.created_at = datetime.fromtimestamp(order.execution_created_at, UTC)
            self.execution = execution
            try:
                job = Job.fetch(order.job_id, connection=self.connection)
                with logs.context(job=job.id, request=job.meta.get("request_id")):
                    self.perform_job(job, queue)
            except BaseException:
                log.exception("work-horse failed outside its job")
                os._exit(1)
            done += 1
            retiring = done >= self.horse_max_jobs
            os.write(reports_fd, RETIRING if retiring else DONE)
            if retiring:
                break

    def horse_started(self) -> None:
        """Called in a new work-horse before its first job (load what its jobs need here)."""

    def teardown(self) -> None:
        if not self.is_horse and self._horse is not None:
            self._horse.close()
            self._horse = None
        super().teardown()

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        # Every job was moved onto an intermediate list (jobs.engine.queue), whatever the number of queues.
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def clean_registries(self) -> None:
        super().clean_registries()
        for queue in self.queues:
            started = set(queue.started_job_registry.get_job_ids(cleanup=False))
            recover_intermediate(queue, started, older_than=self.intermediate_grace)

    # ------------------------------------------------------------------ running jobs

    def get_heartbeat_ttl(self, job: Job) -> int:
        # A job whose worker stops heartbeating is abandoned after this long (RQ allows 60 s
        # more); the maintenance round then retries or fails it. See README, guarantees.
        return 3 * self.job_monitoring_interval + 5

    def setup_work_horse_signals(self) -> None:
        # Shutdown is the worker's decision: SIGTERM and SIGINT sent to every process (the
        # platform's stop, Ctrl-C) must not kill the job before the grace period is over.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def request_stop(self, signum: int, frame: Any) -> None:
        if self._shutdown_deadline is None:
            self._shutdown_deadline = time.monotonic() + self.shutdown_grace
            # Look at the running job every second until it ends or the grace runs out.
            self.job_monitoring_interval = 1
            log.info("worker %s: stopping; a running job gets %s s to finish", self.name, self.shutdown_grace)
        super().request_stop(signum, frame)

    def request_force_stop(self, signum: int, frame: Any) -> None:
        # The platform's SIGTERM and the pool's SIGINT arrive together: the second signal must
        # neither cut a job's grace period short nor break off the worker's clean exit. When the
        # grace period is over the running job is stopped and put back (maintain_heartbeats).
        log.info("worker %s: already stopping", self.name)

    def maintain_heartbeats(self, job: Job) -> None:
        super().maintain_heartbeats(job)
        if self._shutdown_deadline is not None and time.monotonic() > self._shutdown_deadline:
            log.warning("job %s did not finish within the shutdown grace period; putting it back", job.id)
            self._interrupted_job_id = job.id
            self.kill_horse(signal.SIGKILL)
            return
        # The work-horse enforces the timeout itself with SIGALRM; this catches a job that
        # swallows that exception or is stuck in C code, a little after its deadline.
        overdue = (
            job.timeout
            and job.timeout > 0
            and self.current_job_working_time > job.timeout + self.timeout_grace
        )
        if overdue:
            log.warning("job %s ignored its %s s timeout; killing its work-horse", job.id, job.timeout)
            self._timed_out_job_id = job.id
            self.kill_horse()

    # ------------------------------------------------------------------ ends of jobs

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any) -> None:
        super().handle_job_success(job, queue, started_job_registry)
        self._announce(job, "finished")

    def handle_job_failure(
        self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = ""
    ) -> None:
        if self._interrupted_job_id == job.id:
            self._put_back(job, queue)
            return
        error = self._job_errors.pop(job.id, None) or self._error_from_exit(job, exc_string)
        if job.ended_at is None:  # a stopped or killed work-horse never got to set it
            job.ended_at = now()
        try:
            # Refresh first: the work-horse may have saved progress since this copy was read.
            job.get_meta(refresh=True)
            job.meta["error"] = error
            job.save_meta()
        except Exception:  # the failure itself must still be recorded below
            log.exception("could not record the error of job %s", job.id)
        super().handle_job_failure(job, queue, started_job_registry, exc_string)
        status = job.get_status(refresh=False)
        self._announce(job, {JobStatus.FAILED: "failed", JobStatus.STOPPED: "stopped"}.get(status, "retried"))

    def _put_back(self, job: Job, queue: Queue) -> None:
        """A job stopped by a shutdown goes back to the front of its queue, its retries intact."""
        self._interrupted_job_id = None
        job.get_meta(refresh=True)
        job.meta["error"] = {
            "type": "WorkerShutdown",
            "message": "The worker shut down while the job ran; it was put back in its queue.",
        }
        with self.connection.pipeline() as pipe:
            job.save_meta()
            self.cleanup_execution(job, pipeline=pipe)
            queue._enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.execute()
        log.info("job %s put back at the front of %s", job.id, queue.name)
        self._announce(job)

    def _remember_error(self, job: Job, exc_type: type, exc_value: BaseException, tb: Any) -> bool:
        if isinstance(exc_value, AbandonedJobError):
            # Called by the maintenance round for a job whose worker stopped heartbeating;
            # RQ then retries it or marks it failed.
            record_error(job, WORKER_DIED)
            self._announce(job, "retried" if job.retries_left else "failed")
            return True
        self._job_errors[job.id] = describe_exception(job, exc_value)
        return True

    def _error_from_exit(self, job: Job, exc_string: str) -> dict[str, str]:
        if self._stopped_job_id == job.id:
            return {"type": "JobStopped", "message": "The job was stopped by a cancel request."}
        if self._timed_out_job_id == job.id:
            self._timed_out_job_id = None
            return timeout_error(job)
        if "Work-horse terminated unexpectedly" in exc_string:
            match = re.search(r"\(signal (\d+)\)", exc_string)
            how = f" (signal {match.group(1)})" if match else ""
            return {
                "type": "WorkerDied",
                "message": f"The process running the job died before the job ended{how}.",
            }
        if "stuck in intermediate queue" in exc_string:
            return WORKER_DIED
        last_line = exc_string.strip().splitlines()[-1] if exc_string.strip() else ""
        return {"type": "JobFailed", "message": plain_message(last_line)}

    def _announce(self, job: Job, event: str | None = None) -> None:
        """Wake whoever long-polls this job and, for an attempt's end, count it (one round trip)."""
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.publish(keys.JOB_EVENTS_CHANNEL, job.id)
                if event is not None:
                    metrics.record_end(pipe, job, event)
                pipe.execute()
        except Exception:  # waiters fall back to polling; metrics are not worth failing a job for
            log.warning("could not announce the end of job %s", job.id, exc_info=True)


class EmbedWorker(Worker):
    """The worker of the `embedder` process type: its work-horse holds the model.

    torch is never run in the worker itself: a process whose torch has started its thread
    pool can hang a forked child. The worker only imports the libraries (which starts no
    threads), so its long-lived work-horse loads the model in a second, once, and keeps it
    warm for every job it runs. The horse starts with the worker, before the first job.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import sentence_transformers  # noqa: F401 - imported once here, loaded in the horse
        import torch  # noqa: F401

        self._spawn_horse()

    def horse_started(self) -> None:
        from jobs.index.embedding import get_encoder

        encoder = get_encoder()
        encoder.encode(["warm up the model before the first job"])
        log.info("embedding model %s loaded (%d dimensions)", encoder.name, encoder.dimensions)


# An absolute file path inside a message (not part of a URL).
_FILE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.+~-]+/)+[\w.+~-]*")


WORKER_DIED = {
    "type": "WorkerDied",
    "message": "The worker running the job died or lost contact before the job ended.",
}


def record_error(job: RQJob, error: dict[str, str]) -> None:
    job.get_meta(refresh=True)
    job.meta["error"] = error
    job.save_meta()


def describe_exception(job: RQJob, exc: BaseException) -> dict[str, str]:
    """The `error` of the job view for an exception a job raised: type and message, no traceback.

    Clients see it, so file paths and Redis details are left out.
    """
    if isinstance(exc, JobTimeoutException):
        return timeout_error(job)
    if isinstance(exc, UnregisteredJobError):
        return {"type": "UnregisteredJob", "message": str(exc)}
    if isinstance(exc, redis.exceptions.RedisError):
        return {"type": "StoreError", "message": "The job could not reach the job store."}
    text = str(exc).strip()
    return {"type": type(exc).__name__, "message": plain_message(text) if text else type(exc).__name__}


def plain_message(message: str) -> str:
    message = _FILE_PATH.sub("<path>", message.strip())
    return message[:1000] or "The job failed."


def timeout_error(job: RQJob) -> dict[str, str]:
    return {
        "type": "JobTimeout",
        "message": f"The job ran longer than its {job.timeout} s timeout and was stopped.",
    }
