"""The RQ worker class Afterward's workers run; see the Procfile's `worker:` line.

It is RQ's forking `Worker`, with its public hooks overridden: `execute_job` hands each job
to a long-lived work-horse (jobs.engine.horse) and watches it; the failure and success
handlers record what a client should read; the stop handlers give a running job its grace
period. What RQ offers no hook for is listed, and checked, in jobs.engine.rq_touchpoints.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

import redis
from rq import Worker as ForkingWorker
from rq.callbacks import execute_stopped_callback
from rq.command import parse_payload
from rq.exceptions import AbandonedJobError, InvalidJobOperation
from rq.executions import Execution
from rq.job import JobStatus, Retry
from rq.queue import Queue as RQQueue
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import current_timestamp, utcformat
from rq.worker import WorkerStatus

from jobs import batches, callbacks, keys, logs, metrics, quota
from jobs.callbacks import Courier
from jobs.connection import Outage, RedisProbe, process_outage, wait_for_redis, warn_if_evicting
from jobs.engine import dependencies, errors
from jobs.engine.horse import (
    DONE,
    ENDED,
    RETIRING,
    Horse,
    Item,
    Order,
    ProcessState,
    die_with_parent,
    read_orders,
    resident_mb,
)
from jobs.engine.job import Job
from jobs.engine.queue import STOPPING, EmbedQueue, Queue, ring
from jobs.schedules import Ticker
from jobs.settings import get_settings
from jobs.times import now

log = logging.getLogger(__name__)


class Worker(ForkingWorker):
    """RQ's forking worker, with a work-horse that runs job after job until it must be replaced.

    Each job still runs in a forked process apart from the worker: a job that crashes,
    leaks or hangs cannot take the worker down, a timeout always ends it, a cancel kills it,
    and a failed job's process is never reused (jobs.engine.horse says what is).
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
        self._horse: Horse | None = None
        self._in_horse = False
        # Why the running job's horse is being killed, when the worker killed it on purpose.
        self._kill_reason: str | None = None
        # The ids of the jobs the horse is running (read by RQ's command thread).
        self._running_ids: frozenset[str] = frozenset()
        self._shutdown_deadline: float | None = None
        self._stop_announced = False
        self._courier: Courier | None = None
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
        for earlier in [f for f in self.log.filters if isinstance(f, _OneLineOutages)]:
            self.log.removeFilter(earlier)
        self.log.addFilter(_OneLineOutages(self._outage))
        warn_if_evicting(self.connection)

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        # The worker's main thread now runs the work loop: signals reach it through the pipe.
        signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        super().bootstrap(*args, **kwargs)
        # Completion webhooks go out from beside the work loop, never from it (jobs.callbacks).
        self._courier = Courier(self.connection, self.settings)
        self._courier.start()
        # Says within seconds when Redis stops answering and when it answers again.
        self._probe = RedisProbe(self.settings.redis_client_url, self._outage)
        self._probe.start()
        # Recurring schedules: one worker process of all ticks them (jobs.schedules).
        self._ticker = Ticker(self.connection, self.settings)
        self._ticker.start()

    # ------------------------------------------------------------------ taking jobs

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
        # RQ sets IDLE both after a job and before each dequeue: write only a change.
        if pipeline is None and state == self._state:
            return
        super().set_state(state, pipeline=pipeline)

    @property
    def dequeue_timeout(self) -> int:
        # Wake up for maintenance (job recovery) even when no job comes, and heartbeat as often
        # as a busy worker does: a worker silent longer than a job's heartbeat is dead
        # (service.workers.is_live).
        beat = get_settings().job_monitoring_interval
        return max(1, min(self.worker_ttl - 15, self.maintenance_interval, beat))

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run `job` and the jobs taken off its queue together with it (`job.companions`)."""
        batch, job.companions = [job, *job.companions], []
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

    # ------------------------------------------------------------------ the work-horse

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

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """RQ's stop-job, stop-execution and kill-horse commands end here: stop the running job.

        Only the horse is killed: it shares the worker's process group, which RQ's own
        `kill_horse` would signal whole.
        """
        if self._horse is not None:
            self._kill_reason = self._kill_reason or "stopped"
            with suppress(ProcessLookupError):
                os.kill(self._horse.pid, sig)

    def handle_payload(self, message: Any) -> None:
        # RQ's stop-job command stops only the job `get_current_job_id` names: here, any of
        # the jobs the horse runs (the others of its batch are put back, untouched).
        payload = parse_payload(message)
        job_id = payload.get("job_id")
        if payload.get("command") == "stop-job" and job_id in self._running_ids:
            log.info("stopping job %s on request", job_id)
            self._stopped_job_id = job_id
            self.kill_horse()
            return
        super().handle_payload(message)

    def wait_for_horse(self) -> tuple[int | None, int | None, Any]:
        status = self._bury_horse()
        return None, status, None

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

    def _ring_if_capped(self, jobs: list[Job]) -> None:
        """A job that ran under its key's cap (KEY_MAX_ACTIVE) ended: a job of that key held
        back by the cap may run now, so idle workers look at once instead of at their next poll."""
        if not any(job.max_active for job in jobs):
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for queue in self.queues:
                ring(pipe, queue.name)
            pipe.execute()

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

    def _next_look(self) -> float:
        """Seconds until the next look at the running jobs: the monitoring interval, but no
        later than the end of a shutdown grace (a runner kills what is still there soon after)."""
        if self._shutdown_deadline is None or self._kill_reason is not None:
            return self.job_monitoring_interval
        return max(0.0, min(self.job_monitoring_interval, self._shutdown_deadline - time.monotonic()))

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

    def _horse_main(self, orders: Connection, reports: Connection) -> None:
        """The horse: run each order it is sent and report; retire when it must be replaced."""
        random.seed()
        self._in_horse = True
        self._outage.muted = True  # the worker says when Redis is away, once
        self._reports = reports
        signal.set_wakeup_fd(-1)  # the worker's wake-up pipe is the worker's
        self.setup_work_horse_signals()
        self.horse_started()
        state = ProcessState()
        done = 0
        while (order := read_orders(orders)) is not None:
            try:
                succeeded = self._run_order(order)
            except BaseException:
                log.exception("work-horse failed outside its job")
                os._exit(1)
            done += len(order.items)
            state.restore()
            reason = self._retire_reason(succeeded, state, done)
            reports.send_bytes(DONE if reason is None else RETIRING + f" {reason}".encode())
            if reason is not None:
                return

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
        self._ring_if_capped([job for job, _ in running])
        for (job, _), dependents in zip(running, results[: len(running)], strict=True):
            if dependents:
                self._settle_dependents(job, dependents)
            job.send_webhooks(JobStatus.FINISHED)
            log.info("job %s finished in %.3f s", job.id, (job.ended_at - job.started_at).total_seconds())

    def _settle_dependents(self, job: Job, dependents: set[bytes]) -> None:
        try:
            dependencies.settle(self.connection, [member.decode() for member in dependents])
        except Exception:  # the maintenance round settles them (dependencies.sweep)
            log.exception("could not settle the dependents of job %s", job.id)

    def _retire_reason(self, succeeded: bool, state: ProcessState, done: int) -> str | None:
        if not succeeded:
            return "its job did not succeed"
        threads = state.threads_left()
        if threads:
            return f"its job left threads running: {', '.join(threads)}"
        cap = self.settings.horse_max_rss_mb
        if cap and (rss := resident_mb()) > cap:
            return f"{rss:.0f} MB resident, above HORSE_MAX_RSS_MB={cap}"
        if done >= self.settings.horse_max_jobs:
            return f"it ran HORSE_MAX_JOBS={self.settings.horse_max_jobs} jobs"
        return None

    def horse_started(self) -> None:
        """Called in a new work-horse before its first job (load what its jobs need here)."""

    def setup_work_horse_signals(self) -> None:
        # When a job must stop is the worker's decision: SIGTERM and SIGINT sent to the whole
        # process group (a platform's stop, Ctrl-C) are for the worker. A handler that does
        # nothing, not SIG_IGN, so that processes a job starts get the defaults back on exec.
        signal.signal(signal.SIGINT, _for_the_worker)
        signal.signal(signal.SIGTERM, _for_the_worker)

    def teardown(self) -> None:
        if not self._in_horse:
            self._stopping()
            if self._courier is not None:
                self._courier.stop()
                self._courier = None
            if self._probe is not None:
                self._probe.stop()
                self._probe = None
            if self._ticker is not None:
                self._ticker.stop()
                self._ticker = None
            if self._horse is not None:
                self._horse.close()
                self._horse = None
            if self.pubsub_thread is not None:
                # Told to stop before RQ unsubscribes, RQ's listener ends on the reply; told
                # after, it may have taken the reply already and wait for a new subscription,
                # and RQ waits a second for it while the runner's time to kill runs out.
                self.pubsub_thread.stop()
        super().teardown()

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

    # ------------------------------------------------------------------ running jobs

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # A job whose worker stops heartbeating is abandoned after this long (RQ allows 60 s
        # more); the maintenance round then retries or fails it. See README, guarantees.
        return self.settings.heartbeat_ttl

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: a warm stop. The running job gets `SHUTDOWN_GRACE` seconds, then is
        put back (_enforce_limits); an idle worker stops at its next look at its queues.

        A handler runs wherever the main thread happens to be, even inside another run of
        itself: a platform's SIGTERM and the pool's SIGINT arrive together. So it only sets
        flags (no lock, no Redis call, no logging); the main thread does the rest (_stopping).
        """
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)
        if self._shutdown_deadline is None:
            self._shutdown_deadline = time.monotonic() + self.settings.shutdown_grace
            self._shutdown_requested_date = now()
        # Look at the running job every second until it ends or the grace runs out.
        self.job_monitoring_interval = 1
        # RQ's work loop ends after the running job; a waiting dequeue returns no job.
        self._stop_requested = True
        STOPPING.set()

    def request_force_stop(self, signum: int, frame: Any) -> None:
        # Further signals neither cut a job's grace period short nor break off the worker's
        # clean exit. When the grace period is over the running job is stopped and put back.
        pass

    def _stopping(self) -> None:
        """The main thread's part of a stop request: say so, in the log and in Redis, once."""
        if self._shutdown_deadline is None or self._stop_announced:
            return
        self._stop_announced = True
        grace = self.settings.shutdown_grace
        log.info("worker %s: stopping; a running job gets %s s to finish", self.name, grace)
        with suppress(redis.exceptions.RedisError):
            self.set_shutdown_requested_date()
        if self.scheduler:
            self.stop_scheduler()

    # ------------------------------------------------------------------ ends of jobs

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any, execution: Any) -> None:
        super().handle_job_success(job, queue, started_job_registry, execution)
        self._announce(job, "finished")
        self._ring_if_capped([job])

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
        self._ring_if_capped([job])

    def _remember_error(self, job: Job, exc_type: type, exc_value: BaseException, tb: Any) -> bool:
        if isinstance(exc_value, AbandonedJobError):
            # Called by the maintenance round for a job whose worker stopped heartbeating;
            # RQ then retries it or marks it failed.
            errors.record_error(job, errors.WORKER_DIED)
            self._announce(job, "retried" if job.retries_left else "failed")
            return True
        self._errors[job.id] = errors.describe_exception(job, exc_value)
        return True

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
        except Exception:  # waiters fall back to polling, webhooks to the courier's rounds
            log.warning("could not announce the end of job %s", job.id, exc_info=True)


class Scheduler(RQScheduler):
    """RQ's scheduler process, which dies with its worker, ends without a traceback when Redis
    goes away, and queues due jobs through the engine's queues (fair share, doorbell)."""

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
        the queue list itself, past the fair share and without ringing the doorbell."""
        self._status = self.Status.WORKING
        if not self._scheduled_job_registries and self._acquired_locks:
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


class _OneLineOutages(logging.Filter):
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


_for_the_worker: Callable[[int, Any], None] = lambda signum, frame: None  # noqa: E731
