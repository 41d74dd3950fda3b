"""Every place the engine relies on RQ beyond its documented hooks, checked by driving RQ.

Each test below sets up what the engine meets in production, lets RQ's own code run (its
maintenance round, its work loop, its command handling, its success and failure handlers,
its scheduler) and looks at the outcome in Redis or in the process. An RQ release that
changes one of these behaviours fails the test named for it; one that only reformats its
source does not. docs/design.md ("RQ touchpoints") lists each with its reason; the last tests
here keep that list and these tests in step, and show that a check fails when RQ changes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import redis
import rq
from rq import Callback
from rq.command import send_command, send_stop_execution_command, send_stop_job_command
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue as RQIntermediateQueue
from rq.job import Dependency, JobStatus
from rq.worker.base import BaseWorker

from jobs import keys
from jobs.engine import errors
from jobs.engine.job import Job
from jobs.engine.queue import STOPPING, Queue
from jobs.engine.worker import Scheduler, Worker
from tests.support import ROOT

OWNER = "touchpoint-key"


@pytest.fixture
def engine(test_db, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """The engine's queue and worker on a real Redis, in this process (nothing forked yet)."""
    monkeypatch.setenv("EXTRA_JOB_MODULES", "tests.fixtures")
    monkeypatch.setenv("INTERMEDIATE_GRACE", "0")
    queue = Queue("default", connection=real_redis)
    worker = Worker([queue], connection=real_redis)
    yield SimpleNamespace(connection=real_redis, url=test_db.url, queue=queue, worker=worker)
    STOPPING.clear()
    for fd in (worker._wake_read, worker._wake_write):
        os.close(fd)


def submit(engine: SimpleNamespace, value: int = 1, fail: bool = False, **options) -> Job:
    return engine.queue.enqueue(
        "tests.fixtures.note", value=value, fail=fail, meta={"owner": OWNER}, **options
    )


def take_and_start(engine: SimpleNamespace) -> tuple[Job, Execution]:
    """Take the next job as a worker does and mark it started (its execution, its start time,
    off the intermediate list), the way the engine's worker does before handing it over."""
    job, queue = Queue.dequeue_any([engine.queue], None, connection=engine.connection)
    with engine.connection.pipeline() as pipe:
        execution = Execution.create(job, 60, pipeline=pipe, worker_name=engine.worker.name)
        job.prepare_for_execution(engine.worker.name, pipeline=pipe)
        pipe.lrem(queue.intermediate_queue_key, 1, job.id)
        pipe.execute()
    return job, execution


def status(engine: SimpleNamespace, job: Job) -> str:
    return Job.fetch(job.id, connection=engine.connection).get_status().value


# ---------------------------------------------------------------- taking jobs


def test_the_work_loop_takes_jobs_through_the_engines_dequeue_any(engine, monkeypatch):
    """RQ's worker calls `Queue.dequeue_any(queues, timeout, connection=, job_class=, serializer=,
    death_penalty_class=)` of its queue class: the engine's atomic, fair dequeue replaces RQ's."""
    job = submit(engine)
    calls = []
    ours = Queue.dequeue_any.__func__

    def spy(cls, *args, **kwargs):
        calls.append((args, kwargs))
        return ours(cls, *args, **kwargs)

    monkeypatch.setattr(Queue, "dequeue_any", classmethod(spy))
    taken, queue = engine.worker.dequeue_job_and_maintain_ttl(timeout=1)
    assert (taken.id, queue.name) == (job.id, "default")
    assert len(calls) == 1, "RQ's work loop no longer takes jobs through Queue.dequeue_any"
    (queues, timeout), kwargs = calls[0]
    assert [q.name for q in queues] == ["default"] and timeout == 1
    assert kwargs["connection"] is engine.worker.connection and kwargs["job_class"] is Job
    # What the engine's dequeue does and RQ's does not: the job waits on the intermediate list,
    # with the jobs taken together with it beside it.
    assert engine.connection.lrange(queue.intermediate_queue_key, 0, -1) == [job.id.encode()]
    assert taken.companions == []


# ---------------------------------------------------------------- recovering jobs


def test_rqs_maintenance_round_puts_back_a_job_a_dead_worker_took(engine):
    """RQ's `Worker.clean_registries` calls `queue.intermediate_queue.cleanup(worker, queue)` for
    each queue: the engine's cleanup puts back a job a worker took and never started."""
    lost = submit(engine)
    Queue.dequeue_any([engine.queue], None, connection=engine.connection)  # then its worker dies
    assert engine.connection.llen(engine.queue.key) == 0
    for _ in range(2):  # the first round sees it, the next puts it back (INTERMEDIATE_GRACE=0)
        engine.connection.delete(engine.queue.registry_cleaning_key)
        engine.worker.clean_registries()
    assert engine.connection.lrange(engine.queue.key, 0, -1) == [lost.id.encode()], (
        "RQ's maintenance round no longer puts back jobs left on the intermediate list"
    )
    assert engine.connection.llen(engine.queue.intermediate_queue_key) == 0
    assert status(engine, lost) == "queued"


def test_the_engine_reads_rqs_intermediate_list_and_first_seen_marks(engine):
    """The put-back reads RQ's intermediate list (`key`, `get_job_ids`) and RQ's first-seen mark
    (`get_first_seen_key`): the list the engine's dequeue writes is the one RQ keeps."""
    job = submit(engine)
    Queue.dequeue_any([engine.queue], None, connection=engine.connection)
    theirs = RQIntermediateQueue(engine.queue.key, connection=engine.connection)
    assert theirs.key == engine.queue.intermediate_queue_key
    assert theirs.get_job_ids() == [job.id]
    # RQ's own cleanup marks a job it sees there for the first time under get_first_seen_key.
    theirs.cleanup(engine.worker, engine.queue)
    assert engine.connection.exists(theirs.get_first_seen_key(job.id))
    assert engine.connection.lrange(engine.queue.key, 0, -1) == []  # seen once: not yet put back
    engine.queue.intermediate_queue.cleanup(engine.worker, engine.queue)  # the engine's, grace 0
    assert engine.connection.lrange(engine.queue.key, 0, -1) == [job.id.encode()]
    assert not engine.connection.exists(theirs.get_first_seen_key(job.id))


def test_rqs_abandoned_job_cleanup_reports_to_the_workers_exception_handlers(engine):
    """RQ's StartedJobRegistry.cleanup hands `AbandonedJobError` to the worker's exception
    handlers: that is how the engine records `WorkerDied` on a job whose worker vanished."""
    submit(engine)
    job, execution = take_and_start(engine)
    # Its worker stopped heartbeating a while ago: the started registry's entry has expired.
    registry = engine.queue.started_job_registry
    engine.connection.zadd(registry.key, {execution.composite_key: time.time() - 10})
    engine.worker.clean_registries()
    job = Job.fetch(job.id, connection=engine.connection)
    assert job.meta.get("error") == errors.WORKER_DIED, "RQ no longer reports abandoned jobs"
    assert job.get_status() == JobStatus.FAILED


# ---------------------------------------------------------------- running a job


def test_rqs_perform_job_leaves_the_start_to_the_worker(engine):
    """RQ's `perform_job` calls `prepare_job_execution(job, remove_from_intermediate_queue)`,
    which the engine turns into nothing: the worker already started the job in one round trip,
    so the job is started once (one attempt counted), not twice."""
    submit(engine)
    job, execution = take_and_start(engine)
    assert engine.worker.perform_job(job, engine.queue, execution) is True
    assert status(engine, job) == "finished"
    assert engine.connection.hget(job.key, keys.JOB_ATTEMPTS_FIELD) == b"1", (
        "RQ prepared the job a second time: prepare_job_execution is no longer what perform_job calls"
    )


@pytest.mark.parametrize(("fail", "succeeded", "ended"), [(False, True, "finished"), (True, False, "failed")])
def test_perform_job_says_whether_the_job_succeeded(engine, fail, succeeded, ended):
    """The long-lived horse runs each job through RQ's `perform_job(job, queue, execution)` and is
    replaced when it returns False: a job that did not succeed."""
    submit(engine, fail=fail)
    job, execution = take_and_start(engine)
    assert engine.worker.perform_job(job, engine.queue, execution) is succeeded
    assert status(engine, job) == ended


def test_a_job_keeps_the_start_its_worker_recorded(engine):
    """RQ's `perform_job` stamps `job.started_at = now()` before `job.perform()`; the engine's
    Job.perform puts back the time the worker recorded, so a job's start never moves."""
    submit(engine)
    job, execution = take_and_start(engine)
    recorded = Job.fetch(job.id, connection=engine.connection).started_at
    time.sleep(0.05)
    engine.worker.perform_job(job, engine.queue, execution)
    assert Job.fetch(job.id, connection=engine.connection).started_at == recorded


def test_a_plain_success_is_finished_by_the_engine_in_one_transaction(engine, monkeypatch):
    """RQ's `perform_job` ends a success in `_finalize_success(job, queue, execution,
    return_value)`: the engine's finishes a job with no callbacks in one transaction (`_finish`)."""
    finished = []
    ours = Worker._finish

    def spy(self, running, queue, with_meta=False):
        finished.append([job.id for job, _ in running])
        return ours(self, running, queue, with_meta)

    monkeypatch.setattr(Worker, "_finish", spy)
    submit(engine)
    job, execution = take_and_start(engine)
    assert engine.worker.perform_job(job, engine.queue, execution) is True
    assert finished == [[job.id]], "RQ no longer ends a success in _finalize_success"
    result = Job.fetch(job.id, connection=engine.connection).latest_result()
    assert result.return_value == {"value": 1, "together": 1}


def test_the_engines_finish_writes_what_rqs_success_handler_writes(engine):
    """The engine writes what RQ's `handle_job_success` writes (`Job._handle_success`,
    `Job.cleanup`, `cleanup_execution`, the worker's counters), for several jobs in one
    transaction, through the same methods: the two leave a finished job the same."""
    submit(engine, value=1)
    submit(engine, value=2)
    ours, our_execution = take_and_start(engine)
    engine.worker.perform_job(ours, engine.queue, our_execution)  # the engine's _finish
    theirs, their_execution = take_and_start(engine)
    # RQ's own way, as the worker's base class ends a success (the engine's handle_job_success
    # adds only its announcement).
    BaseWorker._finalize_success(engine.worker, theirs, engine.queue, their_execution, {"value": 2})

    def outcome(job: Job, execution: Execution) -> dict:
        job = Job.fetch(job.id, connection=engine.connection)
        return {
            "status": job.get_status().value,
            "result": job.latest_result().type.name,
            "ended": job.ended_at is not None,
            "finished registry": job.id in engine.queue.finished_job_registry,
            "started registry": job.id in engine.queue.started_job_registry,
            "expires": 0 < engine.connection.ttl(job.key) <= engine.worker.default_result_ttl,
            "execution left": bool(engine.connection.exists(execution.key)),
        }

    assert outcome(ours, our_execution) == outcome(theirs, their_execution)
    assert outcome(ours, our_execution)["finished registry"]
    counts = engine.connection.hmget(engine.worker.key, "successful_job_count", "total_working_time")
    assert counts[0] == b"2" and float(counts[1]) > 0


def test_the_horse_rebuilds_the_execution_the_worker_created(engine):
    """The worker creates executions itself (`Execution.create(job, ttl, pipeline,
    worker_name)`), several in one round trip; the horse rebuilds each from its id
    (`Execution(id, job_id, connection, worker_name)`) instead of reading it back."""
    submit(engine)
    job, execution = take_and_start(engine)
    rebuilt = Execution(execution.id, job.id, connection=engine.connection, worker_name=engine.worker.name)
    fetched = Execution.fetch(execution.id, job.id, connection=engine.connection)
    assert (rebuilt.key, rebuilt.composite_key, rebuilt.worker_name) == (
        fetched.key,
        fetched.composite_key,
        fetched.worker_name,
    )
    assert job.id in engine.queue.started_job_registry
    with engine.connection.pipeline() as pipe:
        engine.worker.cleanup_execution(job, pipeline=pipe, execution=rebuilt)
        pipe.execute()
    assert job.id not in engine.queue.started_job_registry
    assert not engine.connection.exists(execution.key)


def test_the_execution_the_horse_sets_is_the_one_rq_reads(engine):
    """The horse sets `worker.execution` for each job it runs (RQ forks a horse per job with it
    in memory): RQ's `get_current_job_id`, which its stop-job command reads, sees that job."""
    submit(engine)
    job, execution = take_and_start(engine)
    engine.worker.execution = Execution(
        execution.id, job.id, connection=engine.connection, worker_name=engine.worker.name
    )
    assert engine.worker.get_current_job_id() == job.id
    assert list(engine.worker.executions) == [execution.id]


def test_callback_names_round_trip_through_the_job_hash(engine):
    """The engine reads the callback names from the stored job hash (`success_callback_name`,
    `failure_callback_name`, `stopped_callback_name`) to check them against the job type
    registry before RQ imports anything."""
    job = submit(
        engine,
        on_success=Callback("tests.fixtures.note"),
        on_failure=Callback("tests.fixtures.mark"),
        on_stopped=Callback("tests.fixtures.hold"),
    )
    fetched = Job.fetch(job.id, connection=engine.connection)
    assert fetched.callback_names == {
        "success_callback_name": "tests.fixtures.note",
        "failure_callback_name": "tests.fixtures.mark",
        "stopped_callback_name": "tests.fixtures.hold",
    }
    with pytest.raises(errors.UnregisteredJobError):  # mark is not a registered job function
        _ = fetched.failure_callback


@pytest.mark.parametrize("how", ["worker", "maintenance"])
def test_every_final_failure_goes_through_job_handle_failure(engine, how):
    """RQ records a final failure through `Job._handle_failure(exc_string, pipeline)`, from the
    worker's failure handler and from the maintenance round's record of an abandoned job: the
    engine's stamps the end and indexes the failed job for its owner (GET /queues, bulk retry)."""
    submit(engine, fail=True)
    job, execution = take_and_start(engine)
    if how == "worker":
        engine.worker.perform_job(job, engine.queue, execution)
    else:
        registry = engine.queue.started_job_registry
        engine.connection.zadd(registry.key, {execution.composite_key: time.time() - 10})
        engine.worker.clean_registries()
    assert status(engine, job) == "failed"
    assert engine.connection.zscore(keys.retryable(OWNER, "failed"), job.id) is not None, (
        "a final failure no longer goes through Job._handle_failure"
    )
    assert Job.fetch(job.id, connection=engine.connection).ended_at is not None


# ---------------------------------------------------------------- stopping a job


@pytest.fixture
def horse() -> Iterator[subprocess.Popen]:
    """A process standing in for the worker's horse: what RQ's commands must end."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def listening(engine) -> Iterator[Worker]:
    """The worker listening to its pub/sub channel, as it does while it runs."""
    engine.worker.subscribe()
    try:
        yield engine.worker
    finally:
        engine.worker.pubsub_thread.stop()  # as the worker's teardown does, so the thread ends at once
        engine.worker.unsubscribe()


@pytest.mark.parametrize("command", ["kill-horse", "stop-execution", "stop-job"])
def test_rqs_commands_stop_the_running_job_through_kill_horse(engine, listening, horse, command):
    """RQ's kill-horse (which reads `horse_pid`), stop-execution and stop-job commands reach
    the engine's horse through `kill_horse()` (`handle_payload` receives them; stop-job is the
    engine's own handling of RQ's payload, for any job of a batch)."""
    submit(engine)
    job, execution = take_and_start(engine)
    worker = engine.worker
    worker._horse = SimpleNamespace(pid=horse.pid)
    worker.executions[execution.id] = execution
    worker._running_ids = frozenset({job.id})
    if command == "kill-horse":
        send_command(engine.connection, worker.name, "kill-horse")
    elif command == "stop-execution":
        send_stop_execution_command(engine.connection, job.id, execution.id)
    else:
        send_stop_job_command(engine.connection, job.id)
    try:
        horse.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"RQ's {command} command no longer reaches the worker's kill_horse")
    assert horse.returncode == -signal.SIGKILL
    if command != "kill-horse":
        assert worker._stopped_job_id == job.id  # the failure handler records `stopped`


def test_rqs_kill_horse_command_leaves_an_idle_worker_alone(engine, listening, horse):
    """RQ's kill-horse command asks `horse_pid` first: with no horse running, nothing is killed."""
    send_command(engine.connection, engine.worker.name, "kill-horse")
    time.sleep(0.5)
    assert horse.poll() is None


# ---------------------------------------------------------------- the work loop


@pytest.fixture
def run_until_stopped(engine, monkeypatch) -> Callable[..., float]:
    """Run the worker's work loop in this (main) thread until a SIGTERM, sent once RQ has
    installed its handler; give back how long the loop took after the signal."""
    monkeypatch.setenv("REDIS_URL", engine.url)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # until RQ installs its own
    sent: list[float] = []

    def stop_when(ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if signal.getsignal(signal.SIGTERM) == engine.worker.request_stop and ready():
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    def run(ready: Callable[[], bool] = lambda: True) -> float:
        stopper = threading.Thread(target=stop_when, args=(ready,), daemon=True)
        stopper.start()
        try:
            engine.worker.work(logging_level="WARNING")
        finally:
            stopper.join()
            signal.set_wakeup_fd(-1)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        assert sent, "the worker never installed its stop handler"
        return time.monotonic() - sent[0]

    return run


def test_an_idle_worker_stops_at_once_on_a_stop_signal(engine, run_until_stopped, monkeypatch):
    """RQ installs `request_stop` for SIGTERM and SIGINT, and its work loop ends when
    `dequeue_job_and_maintain_ttl()` returns no job: a waiting worker asked to stop has its
    dequeue return None (raising from the handler could be swallowed by a log call)."""
    monkeypatch.setenv("JOB_MONITORING_INTERVAL", "30")
    monkeypatch.setenv("MAINTENANCE_INTERVAL", "30")
    engine.worker.job_monitoring_interval = engine.worker.maintenance_interval = 30
    took = run_until_stopped()
    assert took < 3, f"an idle worker took {took:.1f} s to stop"
    assert engine.worker._shutdown_deadline is not None, "RQ no longer calls request_stop on SIGTERM"
    assert engine.worker.shutdown_requested_date is not None


def test_a_stop_signal_lets_the_running_job_finish_and_takes_no_other(engine, run_until_stopped):
    """RQ's loop ends after the running job once `_stop_requested` is set (by `request_stop`):
    the job finishes within its grace, the next job stays queued for another worker."""
    running = engine.queue.enqueue("tests.fixtures.hold", seconds=1.0)
    waiting = submit(engine)
    run_until_stopped(ready=lambda: status(engine, running) == "started")
    assert status(engine, running) == "finished"
    assert status(engine, waiting) == "queued"
    assert engine.connection.lrange(engine.queue.key, 0, -1) == [waiting.id.encode()]


def test_the_worker_sets_up_in_the_main_thread_before_taking_jobs(engine, run_until_stopped, monkeypatch):
    """RQ's `work()` calls `self.bootstrap()` first, in the thread that runs the loop: the
    engine installs its signal wake-up pipe there, so a stop signal that lands on RQ's pub/sub
    thread still wakes the main thread watching the horse."""
    seen = []
    ours = Queue.dequeue_any.__func__

    def spy(cls, *args, **kwargs):
        previous = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(previous)
        seen.append((threading.current_thread() is threading.main_thread(), previous))
        return ours(cls, *args, **kwargs)

    monkeypatch.setattr(Queue, "dequeue_any", classmethod(spy))
    run_until_stopped()
    assert seen, "the work loop never dequeued"
    assert seen[0] == (True, engine.worker._wake_write), "bootstrap no longer runs before the loop"


def test_stopping_ends_rqs_pubsub_thread_without_waiting(engine):
    """`Worker.teardown()` calls `unsubscribe()`, which unsubscribes, then stops and joins
    `pubsub_thread`: the engine stops the thread first, so it ends on the reply at once."""
    engine.worker.subscribe()
    thread = engine.worker.pubsub_thread
    time.sleep(0.2)  # listening
    started = time.monotonic()
    engine.worker.teardown()
    took = time.monotonic() - started
    assert not thread.is_alive(), "RQ's teardown no longer stops its pub/sub thread"
    assert took < 0.9, f"the pub/sub thread took {took:.2f} s to end"


def test_a_workers_socket_timeout_follows_the_maintenance_interval(monkeypatch):
    """RQ's `Worker.__init__` sizes the connection's socket timeout from the intervals it is
    given: the engine passes its own, not RQ's default of 10 minutes."""
    monkeypatch.setenv("MAINTENANCE_INTERVAL", "10")
    monkeypatch.setenv("JOB_MONITORING_INTERVAL", "30")
    connection = redis.Redis(host="127.0.0.1", port=1)  # never connected
    worker = Worker([Queue("default", connection=connection)], connection=connection, prepare_for_work=False)
    assert worker.maintenance_interval == 10
    assert connection.connection_pool.connection_kwargs["socket_timeout"] == 10 + 10


# ---------------------------------------------------------------- scheduled jobs


def test_the_engines_scheduler_queues_due_jobs_from_rqs_registries(engine):
    """The engine's Scheduler walks the registries RQ's scheduler prepares for the queues whose
    locks it holds (`prepare_registries`, `_scheduled_job_registries`, `_acquired_locks`,
    `Status`), and queues each due job through the engine's Queue (fair share, doorbell)."""
    job = engine.queue.enqueue_at(datetime.now(UTC) - timedelta(seconds=1), "tests.fixtures.note", value=1)
    assert status(engine, job) == "scheduled"
    scheduler = Scheduler([engine.queue], connection=engine.connection)
    scheduler.acquire_locks()
    try:
        assert scheduler.acquired_locks == {"default"}
        scheduler.enqueue_scheduled_jobs()
    finally:
        scheduler.release_locks()
    assert status(engine, job) == "queued"
    assert engine.connection.lrange(engine.queue.key, 0, -1) == [job.id.encode()]
    assert engine.connection.llen(keys.doorbell("default")) >= 1, "not queued through the engine's Queue"
    assert scheduler.status == Scheduler.Status.STARTED


def test_the_worker_starts_and_maintenance_restarts_the_engines_scheduler(engine, monkeypatch):
    """The engine's `_start_scheduler` is RQ's with the engine's Scheduler class; RQ's maintenance
    round restarts `worker.scheduler` when its process is gone."""
    job = engine.queue.enqueue_at(datetime.now(UTC) - timedelta(seconds=1), "tests.fixtures.note", value=1)
    engine.worker._start_scheduler(burst=True)  # what work(burst=True, with_scheduler=True) does
    assert isinstance(engine.worker.scheduler, Scheduler)
    assert status(engine, job) == "queued"
    started = []
    monkeypatch.setattr(Scheduler, "start", lambda self: started.append(self))
    engine.worker.last_cleaned_at = datetime.now(UTC) - timedelta(hours=1)
    try:
        engine.worker.run_maintenance_tasks()
        assert started == [engine.worker.scheduler], "RQ's maintenance no longer restarts the scheduler"
    finally:
        engine.worker.scheduler.release_locks()


# ---------------------------------------------------------------- dependencies


@pytest.mark.parametrize(
    ("dependency_ends", "allow_failure", "dependent_ends"),
    [("finished", False, "queued"), ("failed", False, "canceled"), ("failed", True, "queued")],
)
def test_rqs_handlers_settle_dependents_through_the_engine(
    engine, dependency_ends, allow_failure, dependent_ends
):
    """RQ's success and failure handlers hand a finished job's dependents to the engine's
    Queue (`enqueue_ready_jobs_by_queue`, `enqueue_dependents`), whose verdict uses the job's
    `_dependency_ids`, `allow_dependency_failures` and `dependencies_are_met`; a dependent is
    queued through `Queue._enqueue_job`, as RQ's ReadyJobRegistry does."""
    dependency = submit(engine, fail=dependency_ends == "failed")
    dependent = submit(engine, value=2, depends_on=Dependency(jobs=[dependency], allow_failure=allow_failure))
    assert status(engine, dependent) == "deferred"
    job, execution = take_and_start(engine)
    engine.connection.delete(keys.doorbell("default"))
    if dependency_ends == "finished":  # RQ's own success path, not the engine's fast one
        BaseWorker._finalize_success(engine.worker, job, engine.queue, execution, {"value": 1})
    else:
        engine.worker.perform_job(job, engine.queue, execution)
    assert status(engine, job) == dependency_ends
    assert status(engine, dependent) == dependent_ends
    if dependent_ends == "queued":
        assert engine.connection.lrange(engine.queue.key, 0, -1) == [dependent.id.encode()]
        assert engine.connection.llen(keys.doorbell("default")) >= 1, "not queued through the engine's Queue"


# ---------------------------------------------------------------- the list, and a check failing


def test_the_documented_list_names_every_touchpoint_test():
    """docs/design.md lists each touchpoint with the test guarding it: the same tests as here."""
    design = (ROOT / "docs" / "design.md").read_text()
    section = re.split(r"\n#{1,3} ", design.split("\n### RQ touchpoints\n", 1)[1], maxsplit=1)[0]
    documented = set(re.findall(r"`(test_\w+)`", section))
    here = {name for name in globals() if name.startswith("test_")} - {
        "test_the_documented_list_names_every_touchpoint_test",
        "test_a_touchpoint_check_fails_when_rq_changes_the_behaviour_it_guards",
    }
    assert documented == here


def test_a_touchpoint_check_fails_when_rq_changes_the_behaviour_it_guards(engine, monkeypatch):
    # A stand-in for an RQ release whose maintenance round no longer cleans the intermediate list.
    def clean_registries_without_the_intermediate_list(self):
        for queue in self.queues:
            if queue.acquire_maintenance_lock():
                rq.registry.clean_registries(queue, self._exc_handlers)
                rq.worker_registration.clean_worker_registry(queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = rq.utils.now()

    monkeypatch.setattr(
        rq.worker.base.BaseWorker, "clean_registries", clean_registries_without_the_intermediate_list
    )
    with pytest.raises(AssertionError, match="no longer puts back"):
        test_rqs_maintenance_round_puts_back_a_job_a_dead_worker_took(engine)
