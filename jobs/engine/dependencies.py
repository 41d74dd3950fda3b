"""Job dependencies: a job that waits for others (`depends_on`), and what their ends do to it.

RQ's own machinery holds the relation: the job's `dependency_ids` and `dependencies` set, each
dependency's `dependents` set, the `deferred` status and DeferredJobRegistry, and
`allow_dependency_failures`. RQ queues a dependent when its dependencies finish and leaves it
deferred for good otherwise: when one fails, is stopped or canceled, or ended before the
dependent was written. Here every end settles the dependents it holds back:

- every dependency `finished` (or deleted or expired, which RQ counts as met): the dependent
  is queued, through the engine's Queue (fair share, doorbell);
- a dependency `failed` (for good: an attempt that will be retried is no end), `stopped` or
  `canceled`: the dependent ends `canceled`, its error `DependencyFailed` naming that
  dependency, and so do its own dependents in turn; with `allow_failure` it is queued
  instead, once every dependency has ended.

Who settles: whoever records an end, right after the transaction that records it (the
worker's success and failure handlers, Job.cancel, Job.delete), and whoever writes a
dependent, right after its own transaction (a dependency may have ended meanwhile). A
maintenance round settles the deferred jobs of its queue whose dependencies have ended
(IntermediateQueue.cleanup): what a process that died between the two steps, or an expiry,
left behind. Settling a job is a compare-and-set on its status (WATCH), so two processes
settling one job queue it once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import WatchError
from rq.job import JobStatus
from rq.registry import CanceledJobRegistry, DeferredJobRegistry, ReadyJobRegistry
from rq.utils import as_text

from jobs import keys, quota
from jobs.engine import errors
from jobs.engine.job import Job
from jobs.settings import get_settings
from jobs.times import now

log = logging.getLogger(__name__)

# Ends that hold a dependent back for good, unless it allows failures.
ENDED_BADLY = frozenset({JobStatus.FAILED.value, JobStatus.STOPPED.value, JobStatus.CANCELED.value})
# Every end; a dependency that is gone (deleted, expired) counts as finished, as in RQ.
ENDED = ENDED_BADLY | {JobStatus.FINISHED.value}
# Jobs read per round trip while settling.
BATCH = 100
# Tries of a compare-and-set whose job changed under it.
TRIES = 5


@dataclass(frozen=True)
class Verdict:
    """What a deferred job's dependencies say: run it, or cancel it for `failed` (id, status)."""

    run: bool
    failed: tuple[str, str] | None = None


def verdict(statuses: Mapping[str, str | None], allow_failure: bool) -> Verdict | None:
    """The verdict on a job whose dependencies (in its order) have these statuses (None: the
    dependency is gone); None while it must wait."""
    badly = [(job_id, status) for job_id, status in statuses.items() if status in ENDED_BADLY]
    if badly and not allow_failure:
        return Verdict(run=False, failed=badly[0])
    if all(status in ENDED or status is None for status in statuses.values()):
        return Verdict(run=True)
    return None


def statuses_of(connection: Any, job_ids: Iterable[str]) -> dict[str, str | None]:
    """The status of each job, in one round trip (None for a job that is gone)."""
    job_ids = list(job_ids)
    with connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        found = pipe.execute()
    return {job_id: status and as_text(status) for job_id, status in zip(job_ids, found, strict=True)}


def settle_dependents(connection: Any, job_id: str) -> list[str]:
    """Settle the dependents of `job_id`, which just ended; the ids of those queued."""
    dependents = connection.smembers(Job.dependents_key_for(job_id))
    return settle(connection, [as_text(member) for member in dependents])


def settle(connection: Any, job_ids: Iterable[str]) -> list[str]:
    """Queue or cancel each deferred job of `job_ids` whose dependencies have ended (a canceled
    job's dependents next, and theirs: a chain is settled whole); the ids of those queued."""
    todo = deque(dict.fromkeys(job_ids))
    queued = []
    while todo:
        batch = [todo.popleft() for _ in range(min(BATCH, len(todo)))]
        jobs = [
            job
            for job in Job.fetch_many(batch, connection=connection)
            if job is not None and job.get_status(refresh=False) == JobStatus.DEFERRED
        ]
        statuses = statuses_of(connection, {d for job in jobs for d in job.depends_on_ids})
        for job in jobs:
            mine = {d: statuses.get(d) for d in job.depends_on_ids}
            found = verdict(mine, bool(job.allow_dependency_failures))
            if found is None:
                continue
            if found.run:
                if enqueue(connection, job.id, (JobStatus.DEFERRED,)):
                    queued.append(job.id)
            elif cancel(connection, job.id, *found.failed):
                todo.extend(as_text(member) for member in connection.smembers(job.dependents_key))
    return queued


def sweep(connection: Any, queue_name: str) -> list[str]:
    """Maintenance: settle every deferred job of the queue whose dependencies have ended."""
    registry = DeferredJobRegistry(queue_name, connection=connection, job_class=Job)
    return settle(connection, registry.get_job_ids(cleanup=False))


def enqueue(connection: Any, job_id: str, expected: tuple[JobStatus, ...]) -> bool:
    """Queue the job through the engine's Queue if its status is still one of `expected`."""
    from jobs.engine.queue import Queue

    for _ in range(TRIES):
        with connection.pipeline() as pipe:
            try:
                job = _watched(pipe, connection, job_id, expected)
                if job is None:
                    return False
                pipe.multi()
                queue = Queue(job.origin, connection=connection)
                # Where RQ's own step put it, on the way from deferred to queued.
                ReadyJobRegistry(job.origin, connection=connection, job_class=Job).remove(job, pipeline=pipe)
                queue._enqueue_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
                pipe.execute()
                log.info("job %s: its dependencies have ended; queued", job_id)
                return True
            except WatchError:
                continue
    return False


def cancel(connection: Any, job_id: str, dependency_id: str, status: str) -> bool:
    """End the deferred job `canceled`, with a DependencyFailed error naming `dependency_id`."""
    for _ in range(TRIES):
        with connection.pipeline() as pipe:
            try:
                job = _watched(pipe, connection, job_id, (JobStatus.DEFERRED,))
                if job is None:
                    return False
                pipe.multi()
                job.meta["error"] = errors.dependency_failed(dependency_id, status)
                job.ended_at = now()
                job.set_status(JobStatus.CANCELED, pipeline=pipe)
                deferred = DeferredJobRegistry(job.origin, connection=connection, job_class=Job)
                deferred.remove(job, pipeline=pipe)
                CanceledJobRegistry(job.origin, connection=connection, job_class=Job).add(job, pipeline=pipe)
                job.save(pipeline=pipe)
                job.cleanup(get_settings().result_ttl, pipeline=pipe, remove_from_queue=False)
                pipe.publish(keys.JOB_EVENTS_CHANNEL, job.id)
                if job.meta.get(quota.META_FIELD):  # it no longer waits: its place in its key's share frees
                    quota.release(pipe, job.meta.get("owner", ""), job.id)
                from jobs import callbacks

                callbacks.due(pipe, job)
                pipe.execute()
                log.info("job %s canceled: its dependency %s ended %s", job_id, dependency_id, status)
                return True
            except WatchError:
                continue
    return False


def _watched(pipe: Any, connection: Any, job_id: str, expected: tuple[JobStatus, ...]) -> Job | None:
    """The job as it is now, its hash watched; None (unwatched) unless its status is expected."""
    key = Job.key_for(job_id)
    pipe.watch(key)
    fields = pipe.hgetall(key)
    job = Job(job_id, connection=connection)
    if fields:
        job.restore(fields)
    if not fields or job.get_status(refresh=False) not in expected:
        pipe.unwatch()
        return None
    return job
