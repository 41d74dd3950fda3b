"""The RQ worker class Afterward's workers run; see the Procfile's `worker:` line.

It is RQ's forking `Worker`, with its public hooks overridden. This module follows a job's
life, top to bottom: taken off a queue, started, run in a long-lived work-horse, watched,
finished or failed, put back at a shutdown, and announced. The rest of the worker lives
beside it, one concern a module, mixed into the class:

- jobs.engine.maintenance: heartbeats, the maintenance round and RQ's scheduler;
- jobs.engine.shutdown: a stop request, a stop-job command, and the worker's teardown;
- jobs.engine.horse_keeping: forking, killing and burying the work-horse, and its loop.

Where the engine relies on how RQ calls it is listed in docs/design.md ("RQ touchpoints"),
each checked by a test in tests/test_rq_touchpoints.py.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Worker as ForkingWorker
from rq.callbacks import execute_stopped_callback
from rq.exceptions import AbandonedJobError, InvalidJobOperation
from rq.executions import Execution
from rq.job import JobStatus, Retry
from rq.queue import Queue as RQQueue
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import utcformat
from rq.worker import WorkerStatus

from jobs import callbacks, keys, logs, metrics, quota
from jobs.connection import RedisProbe, process_outage, wait_for_redis, warn_if_evicting
from jobs.engine import dependencies, errors
from jobs.engine.horse import (
    DONE,
    ENDED,
    RETIRING,
    Horse,
    Item,
    Order,
)
from jobs.engine.horse_keeping import HorseKeeping
from jobs.engine.job import Job
from jobs.engine.maintenance import Maintenance, OneLineOutages
from jobs.engine.queue import EmbedQueue, Queue, wake_worker
from jobs.engine.shutdown import Shutdown
from jobs.schedules import Ticker
from jobs.settings import get_settings
from jobs.times import now
from jobs.webhook_sender import WebhookSender

log = logging.getLogger(__name__)


class Worker(Maintenance, Shutdown, HorseKeeping, ForkingWorker):
    """RQ's forking worker, with a work-horse that runs job after job until it must be replaced.

    Each job still runs in a forked process apart from the worker: a job that crashes,
    leaks or hangs cannot take the worker down, a timeout always ends it, a cancel kills it,
    and a failed job's process is never reused (jobs.engine.horse says what is).

    A job's life, in the order of this class: RQ's work loop takes it (Queue.dequeue_any,
    waiting at most `dequeue_timeout`) and calls `execute_job`, which starts it (`_start`)
    and sends it to the horse; the horse runs it (`_run_order`, RQ's `perform_job`) while the
    worker watches (`_watch`); it finishes (`_finalize_success`, `_finish`) or fails
    (`handle_job_failure`, `_horse_died`), or a shutdown puts it back (`_put_back`); and its
    end is announced (`_announce`).
    """

    queue_class = Queue
    job_class = Job
    # Fork the next work-horse as soon as one retires (an embedder's loads the model).
    prefork = False

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        settings = get_settings()
        # Whatever the command line says: JSON jobs of our class, from queues of our class, and
        # our intervals, set before RQ sizes the connection's socket timeout from them.
        kwargs.update(
            serializer=JSONSerializer,
            job_class=Job,
            queue_class=type(self).queue_class,
            default_result_ttl=settings.result_ttl,
            job_monitoring_interval=settings.job_monitoring_interval,
            maintenance_interval=settings.maintenance_interval,
        )
        queues = [queues] if isinstance(queues, str | RQQueue) else list(queues)
        connection = kwargs.get("connection") or queues[0].connection
        kwargs["connection"] = connection
        # RQ's worker calls Redis as it is made: a worker started while Redis is unreachable
        # waits for it, saying so once, instead of dying with a traceback and being respawned.
        self._outage = process_outage()
        if kwargs.get("prepare_for_work", True):
            try:
                wait_for_redis(connection, self._outage)
            except KeyboardInterrupt:  # Ctrl-C while waiting: nothing to clean up yet
                raise SystemExit(0) from None
        names = [q.name if isinstance(q, RQQueue) else q for q in queues]
        super().__init__([self.queue_class(name, connection=connection) for name in names], *args, **kwargs)
        self.settings = settings
        self._idle_unwritten = False
        for queue in self.queues:
            queue.before_wait = self.write_idle
        self._horse: Horse | None = None
        self._in_horse = False
        # Why the running job's horse is being killed, when the worker killed it on purpose.
        self._kill_reason: str | None = None
        # The ids of the jobs the horse is running (read by RQ's command thread).
        self._running_ids: frozenset[str] = frozenset()
        self._shutdown_deadline: float | None = None
        self._stop_announced = False
        self._webhook_sender: WebhookSender | None = None
        self._ticker: Ticker | None = None
        self._probe: RedisProbe | None = None
        # When the worker's hash was last kept alive, and until when (time.monotonic()).
        self._beat_at = self._beat_until = float("-inf")
        self._suspension_checked_at = float("-inf")
        # A signal wakes the worker watching its horse at once, whichever of the worker's
        # threads the kernel delivered it to: Python writes it to this pipe (the self-pipe trick).
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        # Errors of failed attempts, by job id, for the failure handler to record.
        self._errors: dict[str, errors.Error] = {}
        self.push_exc_handler(self._remember_error)
        # RQ logs every retry of its work loop and its pub/sub thread while Redis is away.
        for earlier in [f for f in self.log.filters if isinstance(f, OneLineOutages)]:
            self.log.removeFilter(earlier)
        self.log.addFilter(OneLineOutages(self._outage))
        warn_if_evicting(self.connection)

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        # The worker's main thread now runs the work loop: signals reach it through the pipe.
        signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        super().bootstrap(*args, **kwargs)
        # Completion webhooks go out from beside the work loop, never from it (jobs.callbacks).
        self._webhook_sender = WebhookSender(self.connection, self.settings)
        self._webhook_sender.start()
        # Says within seconds when Redis stops answering and when it answers again.
        self._probe = RedisProbe(self.settings.redis_client_url, self._outage)
        self._probe.start()
        # Recurring schedules: one worker process of all ticks them (jobs.schedules).
        self._ticker = Ticker(self.connection, self.settings)
        self._ticker.start()

    # ------------------------------------------------------------------ started

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run `job` and the jobs taken off its queue together with it (`job.taken_with`)."""
        batch, job.taken_with = [job, *job.taken_with], []
        # A cancel can land just before the dequeue read a job; honour it (the status was
        # read with the job itself, so this costs no extra round trip).
        runnable = []
        for each in batch:
            if each.get_status(refresh=False) == JobStatus.CANCELED:
                log.info("job %s was canceled before it started; skipping it", each.id)
                self.connection.lrem(queue.intermediate_queue_key, 1, each.id)
            else:
                runnable.append(each)
        if not runnable:
            return
        with logs.context(job=runnable[0].id, request=runnable[0].meta.get("request_id")):
            running = self._start(runnable, queue)
            order = Order(queue.name, [_item(each, execution) for each, execution in running])
            horse = self._horse or self._spawn_horse()
            if not horse.send(order):  # it died while idle
                self._bury_horse()
                horse = self._spawn_horse()
                horse.send(order)
            self._watch(running, queue, horse)
        self.set_state(WorkerStatus.IDLE)

    def _start(self, jobs: list[Job], queue: Queue) -> list[tuple[Job, Execution]]:
        """Mark the jobs started, in one round trip: each job's execution, its status and
        start time, and its leaving the intermediate list (what RQ does in two, per job: the
        worker's `prepare_execution` and the horse's `prepare_job_execution`)."""
        ttl = self.settings.heartbeat_ttl
        running = []
        with self.connection.pipeline() as pipe:
            for job in jobs:
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
                self.executions[execution.id] = execution
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.persist(job.key)
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                if job.meta.get(quota.META_FIELD):  # no longer waiting: its key's share frees its place
                    quota.release(pipe, job.meta.get("owner", ""), job.id)
                running.append((job, execution))
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            if self._beat_due():
                self.heartbeat(pipeline=pipe)
            pipe.execute()
        self.procline(f"Processing {len(jobs)} job(s) from {queue.name} since {time.time()}")
        return running

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        # The worker did it when it started the job (_start), in the same round trip.
        return None

    # ------------------------------------------------------------------ run, in the work-horse

    def _run_order(self, order: Order) -> bool:
        """Run the order's jobs: together when their type can (`JobType.run_many`), else one by one."""
        queue = self.queue_class(order.queue, connection=self.connection)
        running = [self._restore(item) for item in order.items]
        if len(running) > 1 and self._perform_together(running, queue):
            return True
        succeeded = True
        for job, execution in running:
            self.executions.clear()
            self.execution = execution
            with logs.context(job=job.id, request=job.meta.get("request_id")):
                succeeded = self.perform_job(job, queue, execution) and succeeded
            self._reports.send_bytes(ENDED + f" {job.id}".encode())
        return succeeded

    def _restore(self, item: Item) -> tuple[Job, Execution]:
        """The job and execution the worker started, from what it sent: no Redis read."""
        job = self.job_class(item.job_id, connection=self.connection)
        job.restore(item.job_hash)
        execution = Execution(
            item.execution_id, item.job_id, connection=self.connection, worker_name=self.name
        )
        execution.created_at = execution.last_heartbeat = datetime.fromtimestamp(
            item.execution_created_at, UTC
        )
        execution._job = job
        return job, execution

    def _perform_together(self, running: list[tuple[Job, Execution]], queue: Queue) -> bool:
        """Run jobs of one type in one call of its `run_many` and finish them in one round trip.

        False when they cannot be, or the call failed: then each runs on its own, so one bad
        input fails its own job and not its neighbours.
        """
        jobs = [job for job, _ in running]
        from jobs.types.registry import by_function

        job_type = by_function(self.settings.extra_job_modules).get(jobs[0].func_name)
        if job_type is None or job_type.run_many is None:
            return False
        if any(job.func_name != jobs[0].func_name or not _plain(job) for job in jobs):
            return False
        self.executions.clear()
        for _, execution in running:
            self.executions[execution.id] = execution
        timeout = min(job.timeout or self.queue_class.DEFAULT_TIMEOUT for job in jobs)
        started = now()
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=jobs[0].id):
                for job in jobs:
                    job.check_registered()  # started_at stays what the worker recorded (_start)
                results = job_type.run_many([job.kwargs for job in jobs], self.connection)
        except Exception as error:
            log.warning(
                "%d %s jobs run together failed (%r); running them one by one",
                len(jobs),
                jobs[0].func_name,
                error,
            )
            return False
        ended = now()
        for job, result in zip(jobs, results, strict=True):
            job.ended_at = ended
            job._result = result
            if job_type.final_progress is not None:
                job.meta["progress"] = job_type.final_progress(job.kwargs)
        self._finish(running, queue, with_meta=job_type.final_progress is not None)
        for job in jobs:
            self._reports.send_bytes(ENDED + f" {job.id}".encode())
        log.info(
            "%d %s jobs ran together in %.3f s",
            len(jobs),
            jobs[0].func_name,
            (ended - started).total_seconds(),
        )
        return True

    # ------------------------------------------------------------------ watched, from the worker

    def _watch(self, running: list[tuple[Job, Execution]], queue: Queue, horse: Horse) -> None:
        """Heartbeat until the horse reports its jobs done, enforcing timeouts and shutdown grace."""
        started = time.monotonic()
        self._kill_reason = None
        active = {job.id: (job, execution) for job, execution in running}
        self._running_ids = frozenset(active)
        # The horse's own alarm stops a job at its timeout; a batch that fails as a whole is
        # run again one job at a time, so the longest a batch may take is its shortest
        # timeout plus all of them.
        timeouts = [job.timeout or Queue.DEFAULT_TIMEOUT for job, _ in running]
        budget = sum(timeouts) + (min(timeouts) if len(running) > 1 else 0)
        while True:
            report = horse.wait_report(timeout=self._next_look(), wake=self._wake_read)
            self._stopping()
            if report is None:  # still running
                try:
                    self._heartbeat_all(list(active.values()))
                except redis.exceptions.RedisError:
                    # Cut off from Redis for longer than a heartbeat lasts: the jobs will be
                    # recovered as abandoned elsewhere, so they must not go on here.
                    horse.kill()
                    self._bury_horse()
                    raise
                self._enforce_limits(horse, time.monotonic() - started, budget)
                continue
            if report.startswith(ENDED):
                _, execution = active.pop(report[len(ENDED) :].decode().strip(), (None, None))
                if execution is not None:
                    self.executions.pop(execution.id, None)
                continue
            self._running_ids = frozenset()
            for _, execution in active.values():
                self.executions.pop(execution.id, None)
            if report == DONE:
                return
            if report.startswith(RETIRING):
                log.info("work-horse %s retires: %s", horse.pid, report[len(RETIRING) :].decode().strip())
                self._bury_horse()
                if self.prefork:
                    self._spawn_horse()
                return
            pid, status = horse.pid, self._bury_horse()
            reason, stopped_id = self._kill_reason or "", self._stopped_job_id
            # Last first: jobs put back at the front of their queue keep their order there.
            for job, execution in reversed(active.values()):
                # Stopped beside the one job asked for: it runs again, untouched.
                beside = reason == "stopped" and stopped_id is not None and job.id != stopped_id
                self._horse_died(job, queue, execution, pid, status, "shutdown" if beside else reason)
            self._kill_reason = None
            self._stopped_job_id = None
            if self.prefork:
                self._spawn_horse()
            return

    def _enforce_limits(self, horse: Horse, working_time: float, budget: float) -> None:
        if self._shutdown_deadline is not None and time.monotonic() >= self._shutdown_deadline:
            log.warning("the running job(s) did not finish within the shutdown grace period; putting back")
            self._kill_reason = "shutdown"
            horse.kill()
            return
        # The horse enforces the timeout itself with SIGALRM; this catches a job that
        # swallows that exception or is stuck in C code, a little after its deadline.
        if working_time > budget + self.settings.timeout_grace:
            log.warning("the running job(s) ignored their %s s timeout; killing the work-horse", budget)
            self._kill_reason = "timeout"
            horse.kill()

    # ------------------------------------------------------------------ finished

    def _finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        # RQ's way for what needs it (a returned Retry, callbacks, repeats); otherwise one round trip.
        if isinstance(return_value, Retry) or not _plain(job):
            super()._finalize_success(job, queue, execution, return_value)
            return
        job.ended_at = now()
        job._result = return_value
        self._finish([(job, execution)], queue)

    def _finish(self, running: list[tuple[Job, Execution]], queue: Queue, with_meta: bool = False) -> None:
        """Record jobs that succeeded in one transaction: what RQ's `handle_job_success` writes
        for each (status, result, finished registry, expiry, execution cleanup, worker
        counters), what waiters wait for (the job event) and the job metrics.

        RQ watches a job's dependents key for the whole of that; here the transaction reads
        the dependents waiting (before a job kept for no time is deleted with them), and those
        are settled right after it (jobs.engine.dependencies). A dependent written later sees
        its dependency finished and is queued at once.
        """
        with self.connection.pipeline() as pipe:
            for job, _ in running:
                pipe.smembers(job.dependents_key)
            for job, execution in running:
                job._status = JobStatus.FINISHED
                self.increment_successful_job_count(pipeline=pipe)
                self.increment_total_working_time(job.ended_at - job.started_at, pipe)
                result_ttl = job.get_result_ttl(self.default_result_ttl)
                if result_ttl != 0:
                    job._handle_success(
                        result_ttl,
                        pipeline=pipe,
                        worker_name=self.name,
                        execution_id=execution.id,
                        execution_started_at=execution.created_at,
                        execution_ended_at=job.ended_at,
                    )
                    if with_meta:
                        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
                job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                pipe.publish(keys.JOB_EVENTS_CHANNEL, job.id)
                metrics.record_end(pipe, job, "finished")
                callbacks.due(pipe, job)
            results = pipe.execute()
        self._wake_if_capped([job for job, _ in running])
        for (job, _), dependents in zip(running, results[: len(running)], strict=True):
            if dependents:
                self._settle_dependents(job, dependents)
            job.send_webhooks(JobStatus.FINISHED)
            log.info("job %s finished in %.3f s", job.id, (job.ended_at - job.started_at).total_seconds())

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any, execution: Any) -> None:
        super().handle_job_success(job, queue, started_job_registry, execution)
        self._announce(job, "finished")
        self._wake_if_capped([job])

    def _settle_dependents(self, job: Job, dependents: set[bytes]) -> None:
        try:
            dependencies.settle(self.connection, [member.decode() for member in dependents], Job)
        except Exception:  # the maintenance round settles them (dependencies.sweep)
            log.exception("could not settle the dependents of job %s", job.id)

    def _wake_if_capped(self, jobs: list[Job]) -> None:
        """A job that ran under its key's cap (KEY_MAX_ACTIVE) ended: a job of that key held
        back by the cap may run now, so idle workers look at once instead of at their next poll."""
        if not any(job.max_active for job in jobs):
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for queue in self.queues:
                wake_worker(pipe, queue.name)
            pipe.execute()

    # ------------------------------------------------------------------ failed

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        error = self._errors.pop(job.id, None) or errors.from_exc_string(exc_string)
        if job.ended_at is None:  # a killed work-horse never got to set it
            job.ended_at = now()
        try:
            # Before the status changes, so no one reads `failed` without its error.
            errors.record_error(job, error)
        except Exception:  # the failure itself must still be recorded below
            log.exception("could not record the error of job %s", job.id)
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        status = job.get_status(refresh=False)
        if status == JobStatus.STOPPED and error["type"] != errors.JOB_STOPPED["type"]:
            errors.record_error(job, errors.JOB_STOPPED)  # stopped through RQ's own command
        self._announce(job, {JobStatus.FAILED: "failed", JobStatus.STOPPED: "stopped"}.get(status, "retried"))
        self._wake_if_capped([job])

    def _remember_error(self, job: Job, exc_type: type, exc_value: BaseException, tb: Any) -> bool:
        if isinstance(exc_value, AbandonedJobError):
            # Called by the maintenance round for a job whose worker stopped heartbeating;
            # RQ then retries it or marks it failed.
            errors.record_error(job, errors.WORKER_DIED)
            self._announce(job, "retried" if job.retries_left else "failed")
            return True
        self._errors[job.id] = errors.describe_exception(job, exc_value)
        return True

    def _horse_died(
        self, job: Job, queue: Queue, execution: Execution, pid: int, status: int | None, reason: str
    ) -> None:
        if reason == "shutdown":
            self._put_back(job, queue, execution)
            return
        try:
            if job.get_status() in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED):
                return  # it ended before its horse died
        except InvalidJobOperation:
            return  # it ended and expired meanwhile
        if reason == "timeout":
            error = errors.timed_out(job)
        elif reason == "stopped":
            error = errors.JOB_STOPPED
            try:
                execute_stopped_callback(job, self.death_penalty_class)
            except Exception:
                log.exception("the stopped callback of job %s failed", job.id)
        else:
            signum = os.WTERMSIG(status) if status and os.WIFSIGNALED(status) else None
            error = errors.horse_died(signum)
            log.warning("job %s failed: its work-horse died (wait status %s)", job.id, status)
            self.handle_work_horse_killed(job, pid, status, None)
        self._errors[job.id] = error
        job.ended_at = now()
        self.handle_job_failure(
            job, queue=queue, exc_string=f"{error['type']}: {error['message']}", execution=execution
        )

    # ------------------------------------------------------------------ put back at a shutdown

    def _put_back(self, job: Job, queue: Queue, execution: Execution) -> None:
        """A job stopped by a shutdown goes back to the front of its queue, its retries intact."""
        job.get_meta(refresh=True)
        job.meta["error"] = errors.WORKER_SHUTDOWN
        with self.connection.pipeline() as pipe:
            if job.has_rate_limit:
                # It keeps the slot of its key it holds (RQ's enqueue_job would refuse it here).
                queue._enqueue_job(job, pipeline=pipe, at_front=True)
            else:
                queue.enqueue_job(job, pipeline=pipe, at_front=True)  # first: it starts the transaction
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.execute()
        log.info("job %s put back at the front of %s", job.id, queue.name)
        self._announce(job)

    # ------------------------------------------------------------------ announced

    def _announce(self, job: Job, event: str | None = None) -> None:
        """Wake whoever long-polls this job and, for an attempt's end, count it and make its
        completion webhook due (one round trip)."""
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.publish(keys.JOB_EVENTS_CHANNEL, job.id)
                if event is not None:
                    metrics.record_end(pipe, job, event)
                if event in ("finished", "failed", "stopped"):
                    callbacks.due(pipe, job)
                pipe.execute()
        except Exception:  # waiters fall back to polling, webhooks to their senders' rounds
            log.warning("could not announce the end of job %s", job.id, exc_info=True)


class EmbedWorker(Worker):
    """The worker of the `embedder` process type: its work-horse holds the model.

    torch is never run in the worker itself: a process whose torch has started its thread
    pool can hang a forked child. The worker only imports torch's libraries (which starts no
    threads; nothing for the ONNX backends), so its work-horse loads the model once and
    keeps it warm for every job it runs. A horse starts with the worker, and again as soon
    as one retires.
    """

    prefork = True
    # Its dequeue takes up to EMBED_BATCH_JOBS embed jobs, which its horse runs together.
    queue_class = EmbedQueue

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if get_settings().embed_backend == "torch":
            import sentence_transformers  # noqa: F401 - imported once here, loaded in the horse
            import torch  # noqa: F401
        # onnxruntime may start a native thread as it is imported (its telemetry, which
        # jobs.settings turns off): each horse imports it after the fork, which costs a
        # fraction of a second once per horse.

        self._spawn_horse()

    def horse_started(self) -> None:
        from jobs.index.embedding import get_encoder

        encoder = get_encoder()
        encoder.encode(["warm up the model before the first job"])
        log.info("embedding model %s loaded (%d dimensions)", encoder.name, encoder.dimensions)


def _item(job: Job, execution: Execution) -> Item:
    """What the horse needs of a started job: its hash as it now is in Redis."""
    started = {
        b"status": job.get_status(refresh=False).value.encode(),
        b"started_at": utcformat(job.started_at).encode(),
        b"last_heartbeat": utcformat(job.last_heartbeat).encode(),
        b"worker_name": job.worker_name.encode(),
        keys.JOB_ATTEMPTS_FIELD.encode(): str(job.attempts).encode(),
    }
    return Item(job.id, execution.id, execution.created_at.timestamp(), {**job.hash, **started})


def _plain(job: Job) -> bool:
    """A job whose success needs nothing beyond the fast path: no callbacks, no repeats."""
    return not job.callback_names and job.repeats_left is None
