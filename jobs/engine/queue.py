"""RQ's queue with a dequeue that cannot lose a job, even for workers on several queues.

Stock RQ takes a job off several queues with BLPOP: once Redis has popped the id, a worker
that dies before recording the job as started (or whose socket outlives it in a forked
child) loses the job for good. Here a Lua script moves the id, in priority order, from the
first non-empty queue onto that queue's intermediate list in one atomic step; it leaves the
intermediate list only in the transaction that records the job as started, and a job left
there by a dead worker is put back at the front of its queue by RQ's own maintenance round,
through `IntermediateQueue.cleanup`.

Which job a worker takes is fair between API keys (jobs.engine.fair): the same script picks
the job of the key with the fewest jobs running, and pushes queue one job per key at a time.

Idle workers block on their queues' wake-up lists, to which every push adds a signal, with a one-second
fallback poll, since Redis cannot block on "move from the first non-empty of several lists".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from rq import Queue as RQQueue
from rq.exceptions import DequeueTimeout
from rq.intermediate_queue import IntermediateQueue as RQIntermediateQueue
from rq.job import JobStatus

from jobs import keys
from jobs.engine import dependencies, fair
from jobs.engine.job import Job
from jobs.settings import get_settings

log = logging.getLogger(__name__)

# Longest a waiting worker sleeps before it looks at the queues again.
IDLE_POLL_SECONDS = 1


class Flag:
    """A flag a signal handler may set. Unlike threading.Event it takes no lock: a handler that
    interrupted the main thread inside Event.set, then ran again, would wait on itself forever."""

    def __init__(self) -> None:
        self._value = False

    def set(self) -> None:
        self._value = True

    def clear(self) -> None:
        self._value = False

    def is_set(self) -> bool:
        return self._value


# Set when this worker process is asked to stop: a waiting dequeue then returns no job, which
# ends RQ's work loop (jobs.engine.worker.Worker.request_stop).
STOPPING = Flag()

# Move a job id from the intermediate list back to the front of its queue, and forget when
# it was first seen there, in one step (a worker taking it again starts a new clock).
_RECOVER = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
  return 1
end
return 0
"""


class Queue(fair.FairQueue):
    """The engine's queue: pushes through the fair share (fair.FairQueue), dependencies settled
    by the engine, and a dequeue that cannot lose a job (see the module's docstring)."""

    job_class = Job

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["job_class"] = Job
        super().__init__(*args, **kwargs)
        # What a worker taking from this queue writes in the round trip that starts its wait
        # for work (its state, idle: jobs.engine.maintenance), so that a worker taking job
        # after job writes no state between them.
        self.before_wait: Callable[[Any], None] | None = None

    @property
    def intermediate_queue(self) -> IntermediateQueue:
        return IntermediateQueue(self.key, connection=self.connection)

    def acquire_maintenance_lock(self) -> bool:
        # RQ holds this lock for up to 15 minutes if its worker dies while cleaning, which
        # would stall the recovery of abandoned jobs; a minute is plenty for one round.
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=60))

    # ------------------------------------------------------------------ dependencies

    def setup_dependencies(self, job: Job, pipeline: Any = None) -> Job:
        """RQ's, but in a transaction already begun (a submission's, or several jobs'), where
        RQ cannot WATCH the dependencies first: there the job is deferred as it is written, and
        whoever runs the transaction settles it after (jobs.engine.dependencies.settle)."""
        if job.depends_on_ids and pipeline is not None and pipeline.explicit_transaction:
            job.set_status(JobStatus.DEFERRED, pipeline=pipeline)
            job.register_dependency(pipeline=pipeline)
            job.save(pipeline=pipeline)
            job.cleanup(ttl=job.ttl, pipeline=pipeline)
            return job
        return super().setup_dependencies(job, pipeline=pipeline)

    def enqueue_job(
        self, job: Job, pipeline: Any = None, at_front: bool = False, unique: bool = False
    ) -> Job:
        job = super().enqueue_job(job, pipeline=pipeline, at_front=at_front, unique=unique)
        if pipeline is None and job.get_status(refresh=False) == JobStatus.DEFERRED:
            # RQ defers a job whose dependency already failed, was stopped or canceled, for good.
            dependencies.settle(self.connection, [job.id], self.job_class)
            if job.get_status() != JobStatus.DEFERRED:
                job.refresh()
        return job

    def enqueue_dependents(
        self, job: Job, exclude_job_id: str | None = None, refresh_job_status: bool = True
    ) -> dict[str, list[str]]:
        """RQ's worker calls this after a job failed for good or was stopped: RQ queues the
        dependents that allow failures and leaves the others deferred; here each dependent is
        queued or canceled (jobs.engine.dependencies)."""
        if exclude_job_id is not None:  # RQ's cancel(enqueue_dependents=True) of `job`
            return super().enqueue_dependents(job, exclude_job_id, refresh_job_status)
        queued = dependencies.settle_dependents(self.connection, job.id, self.job_class)
        return {self.name: queued} if queued else {}

    def enqueue_ready_jobs_by_queue(self, job_ids_by_queue_name: dict[str, list[str]]) -> None:
        """Queue the dependents RQ's own step readied, through the engine's Queue (RQ's
        ReadyJobRegistry pushes them with RQ's Queue: past the fair share, no wake-up signal)."""
        dependencies.enqueue_ready(self.connection, job_ids_by_queue_name, self.job_class)

    @property
    def count(self) -> int:
        """Every queued job: those on the queue and those of each key waiting behind its one
        there (what rq-dashboard and `rq info` show)."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.llen(self.key)
            pipe.get(keys.fair_waiting_count(self.name))
            on_queue, behind = pipe.execute()
        return on_queue + max(0, int(behind or 0))

    def empty(self) -> int:
        # The queue's jobs, and those of each key waiting behind them.
        emptied = super().empty()
        return emptied + fair.empty(self.connection, self, self.job_class.redis_job_namespace_prefix)

    @classmethod
    def batch_limits(cls) -> tuple[int, int]:
        """How many jobs one dequeue may take together, and up to how many bytes of job data."""
        return 1, 0

    @classmethod
    def dequeue_any(
        cls,
        queues: Iterable[RQQueue],
        timeout: int | None,
        connection: redis.Redis,
        job_class: Any = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Queue] | None:
        """The next job, with the jobs taken together with it as its `taken_with` (a batch);
        each read with its hash in the same round trip that moved it off its queue."""
        queues = list(queues)
        by_key = {q.key: q for q in queues}
        take = connection.register_script(fair.TAKE)
        script_keys = [key for q in queues for key in fair.take_keys(q, q.started_job_registry.key)]
        waiting = [keys.fair_waiting_prefix(q.name) for q in queues]
        most, budget = cls.batch_limits()
        prefix = Job.redis_job_namespace_prefix
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if STOPPING.is_set():  # a worker asked to stop takes no new job
                return None
            args = [most, budget, prefix, time.time(), fair.SCAN, fair.WAKEUP_LIMIT, *waiting]
            taken = take(keys=script_keys, args=args)
            if taken:
                queue = by_key[_text(taken[0])]
                jobs = [
                    job
                    for job_id, fields in zip(taken[1::2], taken[2::2], strict=True)
                    if (job := _restore(_text(job_id), fields, queue)) is not None
                ]
                if not jobs:
                    continue
                jobs[0].taken_with = jobs[1:]
                return jobs[0], queue
            if deadline is None:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DequeueTimeout(timeout, list(by_key))
            wakeups = [keys.wakeup_list(queue.name) for queue in queues]
            wait = max(1, min(IDLE_POLL_SECONDS, int(remaining)))
            hooks = {hook for q in queues if (hook := getattr(q, "before_wait", None)) is not None}
            if hooks:
                with connection.pipeline(transaction=False) as pipe:
                    for hook in hooks:
                        hook(pipe)
                    pipe.blpop(wakeups, timeout=wait)
                    pipe.execute()
            else:
                connection.blpop(wakeups, timeout=wait)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _restore(job_id: str, fields: list[bytes], queue: Queue) -> Job | None:
    """The job from the hash the dequeue script read; None (and off the intermediate list) when
    it was deleted while queued: nothing to run, nothing to keep."""
    if not fields:
        queue.connection.lrem(queue.intermediate_queue_key, 1, job_id)
        return None
    job = Job(job_id, connection=queue.connection)
    job.hash = dict(zip(fields[::2], fields[1::2], strict=True))
    job.restore(job.hash)
    return job


class EmbedQueue(Queue):
    """The embedder's queues: one dequeue takes up to `EMBED_BATCH_JOBS` jobs together."""

    # Stop adding jobs to a batch once their data (mostly their texts) passes this size.
    BATCH_BYTES = 256 * 1024

    @classmethod
    def batch_limits(cls) -> tuple[int, int]:
        return max(1, get_settings().embed_batch_jobs), cls.BATCH_BYTES


def wake_worker(pipe: Any, queue: str) -> None:
    """Wake one idle worker of `queue`: a job was just pushed onto it."""
    pipe.lpush(keys.wakeup_list(queue), 1)
    pipe.ltrim(keys.wakeup_list(queue), 0, fair.WAKEUP_LIMIT - 1)


class IntermediateQueue(RQIntermediateQueue):
    """RQ's intermediate list, whose maintenance puts a job back instead of failing it.

    RQ's maintenance round (`Worker.clean_registries`) calls `cleanup` on each queue's
    intermediate list: this is the one recovery path for jobs a worker took but never
    started. Such a job never ran, so it goes back to the front of its queue with its retries
    intact, `INTERMEDIATE_GRACE` seconds after maintenance first saw it there. The same round
    moves on any key whose front job left the queue unannounced (jobs.engine.fair), drops
    expired entries of the queue's stopped-jobs count, and settles the deferred jobs whose
    dependencies have ended (jobs.engine.dependencies).
    """

    def cleanup(self, worker: Any, queue: RQQueue) -> None:
        recover_intermediate(self, queue, older_than=get_settings().intermediate_grace)
        fair.repair(queue.connection, queue, Job.redis_job_namespace_prefix)
        queue.connection.zremrangebyscore(keys.stopped(queue.name), "-inf", time.time())
        dependencies.sweep(queue.connection, queue.name, Job)


def recover_intermediate(
    intermediate: RQIntermediateQueue, queue: RQQueue, older_than: float, now: float | None = None
) -> list[str]:
    """Put back at the front of `queue` every job on its intermediate list that a worker took
    but never started, `older_than` seconds after it was first seen there."""
    connection = queue.connection
    recover = connection.register_script(_RECOVER)
    started = set(queue.started_job_registry.get_job_ids(cleanup=False))
    now = time.time() if now is None else now
    recovered = []
    for job_id in intermediate.get_job_ids():
        seen_key = intermediate.get_first_seen_key(job_id)
        if job_id in started:
            connection.delete(seen_key)
            continue
        connection.set(seen_key, now, nx=True, ex=24 * 3600)
        first_seen = float(connection.get(seen_key) or now)
        if now - first_seen < older_than:
            continue
        if recover(keys=[intermediate.key, queue.key, seen_key], args=[job_id]):
            log.warning("job %s was taken by a worker that never started it; requeued", job_id)
            recovered.append(job_id)
            with connection.pipeline() as pipe:
                wake_worker(pipe, queue.name)
                pipe.execute()
    return recovered
