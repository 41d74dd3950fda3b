"""Where the engine leans on RQ beyond the hooks RQ documents, each with why and a check.

The engine extends RQ the way RQ's own variants do: subclasses of `Worker`, `Queue` and
`Job` that override public methods. Some of those overrides only work because RQ calls them
in a particular way, or hand them particular arguments; an RQ release could change that
without a deprecation. Each such reliance is listed here. `tests/test_rq_touchpoints.py`
runs every check, so an upgrade of RQ that breaks one fails the suite naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from rq import Queue, Worker
from rq.command import handle_command
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.scheduler import RQScheduler
from rq.worker.base import BaseWorker


@dataclass(frozen=True)
class Touchpoint:
    name: str
    why: str
    check: Callable[[], bool]


def _params(function: Callable, *names: str) -> bool:
    parameters = inspect.signature(function).parameters
    return all(name in parameters for name in names)


def _source_mentions(function: Callable, *needles: str) -> bool:
    source = inspect.getsource(function)
    return all(needle in source for needle in needles)


TOUCHPOINTS = (
    Touchpoint(
        "Queue.dequeue_any(queues, timeout, connection, job_class, serializer, death_penalty_class)",
        "jobs.engine.queue replaces RQ's BLPOP dequeue with an atomic move onto the intermediate "
        "list; the worker calls it with exactly these arguments.",
        lambda: _params(Queue.dequeue_any, "queues", "timeout", "connection", "job_class", "serializer"),
    ),
    Touchpoint(
        "Worker.clean_registries() calls queue.intermediate_queue.cleanup(worker, queue)",
        "Our IntermediateQueue.cleanup puts back jobs a dead worker took; RQ's own maintenance "
        "round must be what calls it, so that there is one recovery path.",
        lambda: _source_mentions(BaseWorker.clean_registries, "intermediate_queue.cleanup(self, queue)"),
    ),
    Touchpoint(
        "IntermediateQueue.get_job_ids / get_first_seen_key / key",
        "The put-back reads the list and RQ's first-seen mark, and deletes the mark with the job.",
        lambda: all(hasattr(IntermediateQueue, name) for name in ("get_job_ids", "get_first_seen_key")),
    ),
    Touchpoint(
        "Worker.prepare_job_execution(job, remove_from_intermediate_queue)",
        "RQ removes the id from the intermediate list only for single-queue workers; the engine "
        "moves every job there, so it always asks for the removal.",
        lambda: _params(BaseWorker.prepare_job_execution, "job", "remove_from_intermediate_queue"),
    ),
    Touchpoint(
        "Worker.perform_job(job, queue, execution) -> bool",
        "The long-lived horse runs each job through RQ's own perform_job and recycles itself "
        "when it returns False (the job did not succeed).",
        lambda: (
            _params(BaseWorker.perform_job, "job", "queue", "execution")
            and inspect.signature(BaseWorker.perform_job).return_annotation in (bool, "bool")
        ),
    ),
    Touchpoint(
        "Worker.execution (settable) and Worker.executions",
        "RQ forks a horse per job with the execution in memory; ours re-fetches it per job "
        "(Execution.fetch, as RQ's SpawnWorker does) and sets it.",
        lambda: (
            isinstance(inspect.getattr_static(BaseWorker, "execution"), property)
            and inspect.getattr_static(BaseWorker, "execution").fset is not None
            and _params(Execution.fetch, "id", "job_id", "connection")
        ),
    ),
    Touchpoint(
        "RQ's stop-job, stop-execution and kill-horse commands call worker.kill_horse()",
        "Our horse shares the worker's process group, so kill_horse is overridden to kill the "
        "horse alone; a cancel reaches the running job only through it.",
        lambda: (
            _source_mentions(inspect.getmodule(handle_command), "worker.kill_horse()")
            and _source_mentions(BaseWorker.request_stop_execution, "self.kill_horse()")
        ),
    ),
    Touchpoint(
        "Worker.horse_pid (property) and Worker.wait_for_horse()",
        "RQ's commands and cold shutdown read horse_pid and wait for the horse: both overridden "
        "to mean our long-lived horse.",
        lambda: (
            isinstance(inspect.getattr_static(BaseWorker, "horse_pid"), property)
            and hasattr(Worker, "wait_for_horse")
        ),
    ),
    Touchpoint(
        "Job hash fields success_callback_name / failure_callback_name / stopped_callback_name",
        "jobs.engine.job reads the callback names from the stored hash (Job.restore) to check "
        "them against the registry before anything is imported.",
        lambda: all(
            f"'{field}'" in inspect.getsource(Job.to_dict)
            for field in ("success_callback_name", "failure_callback_name", "stopped_callback_name")
        ),
    ),
    Touchpoint(
        "StartedJobRegistry.cleanup passes AbandonedJobError to the worker's exception handlers",
        "That is how the engine learns a job was abandoned and records WorkerDied in its view.",
        lambda: _source_mentions(StartedJobRegistry.cleanup, "call_exception_handlers", "AbandonedJobError"),
    ),
    Touchpoint(
        "Worker.request_stop is the SIGINT/SIGTERM handler; the work loop ends on _stop_requested",
        "The shutdown grace period starts in request_stop, which only sets flags (it may "
        "interrupt itself); RQ's work loop stops after the running job when _stop_requested is set.",
        lambda: (
            _source_mentions(BaseWorker._install_signal_handlers, "self.request_stop")
            and _source_mentions(BaseWorker.work, "self._stop_requested")
        ),
    ),
    Touchpoint(
        "Worker.work() calls self.bootstrap() first, in the worker's main thread",
        "The worker installs its signal wake-up pipe there: a stop signal that lands on RQ's "
        "pub/sub thread must still wake the main thread watching the horse.",
        lambda: _source_mentions(BaseWorker.work, "self.bootstrap("),
    ),
    Touchpoint(
        "Worker.work() ends its loop when dequeue_job_and_maintain_ttl() returns no job",
        "An idle worker asked to stop has its dequeue return None, instead of raising "
        "StopRequested from the signal handler (which a log call in progress would swallow).",
        lambda: (
            _source_mentions(BaseWorker.work, "if result is None:", "break")
            and _source_mentions(
                BaseWorker.dequeue_job_and_maintain_ttl, "result = self.queue_class.dequeue_any("
            )
        ),
    ),
    Touchpoint(
        "perform_job() calls self.prepare_job_execution(...) and self._finalize_success(job, queue, "
        "execution, return_value)",
        "The worker marks a job started in the round trip that creates its execution, so the "
        "horse's prepare_job_execution does nothing; a plain success is finished through "
        "_finalize_success in one transaction.",
        lambda: (
            _source_mentions(BaseWorker.perform_job, "self.prepare_job_execution(", "self._finalize_success(")
            and _params(BaseWorker._finalize_success, "job", "queue", "execution", "return_value")
        ),
    ),
    Touchpoint(
        "perform_job() sets job.started_at = now() before job.perform()",
        "The worker records started_at when it starts the job; Job.perform puts that time back "
        "over the horse's second stamp, so a job's start never moves.",
        lambda: _source_mentions(BaseWorker.perform_job, "job.started_at = now()", "job.perform()"),
    ),
    Touchpoint(
        "The writes of handle_job_success: Job._handle_success, Job.cleanup, cleanup_execution, "
        "the worker's job counters and _enqueue_dependents_safely",
        "Worker._finish writes what RQ's handle_job_success writes, for several jobs in one "
        "transaction, through the same methods.",
        lambda: (
            _params(
                Job._handle_success,
                "result_ttl",
                "pipeline",
                "worker_name",
                "execution_id",
                "execution_started_at",
                "execution_ended_at",
            )
            and _params(Job.cleanup, "ttl", "pipeline", "remove_from_queue")
            and _source_mentions(
                BaseWorker.handle_job_success,
                "job._handle_success(",
                "job.cleanup(",
                "self.cleanup_execution(",
                "self.increment_successful_job_count(",
                "self.increment_total_working_time(",
            )
            and hasattr(BaseWorker, "_enqueue_dependents_safely")
        ),
    ),
    Touchpoint(
        "Execution.create(job, ttl, pipeline, worker_name); Execution(id, job_id, connection, worker_name)",
        "The worker creates executions itself, several in one round trip, and the horse rebuilds "
        "them from what the worker sent instead of reading them back.",
        lambda: (
            _params(Execution.create, "job", "ttl", "pipeline", "worker_name")
            and _params(Execution.__init__, "id", "job_id", "connection", "worker_name")
        ),
    ),
    Touchpoint(
        "Worker.handle_payload(message) receives RQ's commands; parse_payload decodes them",
        "stop-job for any job of a batch the horse runs (RQ's handler only knows the first).",
        lambda: _source_mentions(BaseWorker.handle_payload, "parse_payload(message)"),
    ),
    Touchpoint(
        "Job._handle_failure(exc_string, pipeline, ...) records every final failure",
        "The job class stamps ended_at and indexes stopped and failed jobs (GET /queues, bulk "
        "retry) there; RQ calls it from the worker's failure handler and from the maintenance "
        "round's record of an abandoned job.",
        lambda: (
            _params(Job._handle_failure, "exc_string", "pipeline")
            and _source_mentions(BaseWorker.handle_job_failure, "job._handle_failure(")
            and _source_mentions(record_job_failure, "job._handle_failure(")
        ),
    ),
    Touchpoint(
        "RQScheduler.enqueue_scheduled_jobs: _scheduled_job_registries, prepare_registries, "
        "_acquired_locks, Status",
        "The engine's scheduler queues due jobs through its own Queue (fair share, doorbell); "
        "it walks the registries RQ's scheduler prepares, as RQ's own method does.",
        lambda: (
            _source_mentions(
                RQScheduler.enqueue_scheduled_jobs,
                "self._scheduled_job_registries",
                "self.prepare_registries()",
                "self._acquired_locks",
                "registry.get_jobs_to_schedule(",
            )
            and hasattr(RQScheduler, "Status")
        ),
    ),
    Touchpoint(
        "Worker._start_scheduler makes the scheduler; maintenance restarts a dead one",
        "The engine's _start_scheduler is RQ's with its own Scheduler class (one that stops "
        "quietly when Redis goes away); RQ's maintenance must restart that instance.",
        lambda: (
            _source_mentions(BaseWorker._start_scheduler, "self.scheduler = RQScheduler(", "acquire_locks()")
            and _source_mentions(
                BaseWorker.run_maintenance_tasks, "self.scheduler.acquire_locks(auto_start=True)"
            )
        ),
    ),
    Touchpoint(
        "Dependencies: Queue._enqueue_job(job, pipeline, at_front), Queue.setup_dependencies, "
        "enqueue_dependents and enqueue_ready_jobs_by_queue; Job._dependency_ids, "
        "allow_dependency_failures, dependencies_are_met",
        "jobs.engine.dependencies queues a settled dependent as RQ's ReadyJobRegistry does, "
        "through _enqueue_job; the engine's Queue and Job override RQ's dependency steps by name.",
        lambda: (
            _params(Queue._enqueue_job, "job", "pipeline", "at_front")
            and _params(Queue.setup_dependencies, "job", "pipeline")
            and _params(Queue.enqueue_dependents, "job", "exclude_job_id", "refresh_job_status")
            and _params(Queue.enqueue_ready_jobs_by_queue, "job_ids_by_queue_name")
            and _params(Job.dependencies_are_met, "parent_job", "pipeline", "exclude_job_id")
            and _source_mentions(Job.restore, "self._dependency_ids", "self.allow_dependency_failures")
            and _source_mentions(BaseWorker.handle_job_failure, "self._enqueue_dependents_safely(")
        ),
    ),
    Touchpoint(
        "Worker.__init__ sizes the socket timeout from maintenance_interval",
        "The engine passes its intervals to RQ's constructor, so the connection's socket "
        "timeout follows MAINTENANCE_INTERVAL instead of RQ's default of 10 minutes.",
        lambda: (
            _source_mentions(BaseWorker.__init__, "self.maintenance_interval = maintenance_interval")
            and _source_mentions(BaseWorker.__init__, "_set_connection")
        ),
    ),
    Touchpoint(
        "Worker.teardown() calls unsubscribe(), which unsubscribes, then stops and joins pubsub_thread",
        "The worker stops RQ's pub/sub thread before RQ unsubscribes, so that the thread ends on "
        "the reply rather than RQ waiting a second for it at a stop.",
        lambda: (
            _source_mentions(BaseWorker.teardown, "self.unsubscribe()")
            and _source_mentions(
                BaseWorker.unsubscribe, "self.pubsub.unsubscribe()", "self.pubsub_thread.join("
            )
        ),
    ),
)


def broken() -> list[Touchpoint]:
    """The touchpoints this RQ no longer satisfies."""
    failing = []
    for touchpoint in TOUCHPOINTS:
        try:
            ok = touchpoint.check()
        except (AttributeError, OSError, TypeError, ValueError):
            ok = False
        if not ok:
            failing.append(touchpoint)
    return failing
