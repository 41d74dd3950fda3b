"""Job dependencies without a worker: the verdict, and each end settling its dependents (fakeredis)."""

from __future__ import annotations

import pytest
from rq.job import Dependency, JobStatus

from jobs.engine import dependencies
from jobs.engine.dependencies import Verdict, verdict
from jobs.engine.job import Job
from jobs.engine.queue import Queue


@pytest.mark.parametrize(
    ("statuses", "allow_failure", "expected"),
    [
        ({"a": "finished", "b": "finished"}, False, Verdict(run=True)),
        ({"a": "finished", "b": None}, False, Verdict(run=True)),  # gone: met, as in RQ
        ({"a": "finished", "b": "started"}, False, None),
        ({"a": "scheduled"}, False, None),  # a failed attempt waiting for its retry: no end
        ({"a": "started", "b": "failed"}, False, Verdict(run=False, failed=("b", "failed"))),
        ({"a": "stopped", "b": "canceled"}, False, Verdict(run=False, failed=("a", "stopped"))),
        ({"a": "failed", "b": "started"}, True, None),
        ({"a": "failed", "b": "stopped", "c": "canceled", "d": "finished"}, True, Verdict(run=True)),
    ],
)
def test_verdict(statuses, allow_failure, expected):
    assert verdict(statuses, allow_failure) == expected


def enqueue(queue: Queue, *depends_on: str, allow_failure: bool = False):
    job = queue.create_job(
        "jobs.types.log.write_log",
        kwargs={"message": "x"},
        depends_on=Dependency(jobs=list(depends_on), allow_failure=allow_failure) if depends_on else None,
    )
    return queue.enqueue_job(job)


def test_a_deleted_dependency_lets_its_dependent_run(fake_redis):
    queue = Queue("default", connection=fake_redis)
    first = enqueue(queue)
    second = enqueue(queue, first.id)
    assert second.get_status() == JobStatus.DEFERRED
    first.delete()
    assert second.get_status() == JobStatus.QUEUED
    assert queue.job_ids == [second.id]


def test_a_dependency_ended_before_its_dependent_was_written_settles_it_at_once(fake_redis):
    queue = Queue("default", connection=fake_redis)
    first = enqueue(queue)
    first.cancel()
    second = enqueue(queue, first.id)
    assert second.get_status() == JobStatus.CANCELED
    assert second.meta["error"]["type"] == "DependencyFailed"
    assert enqueue(queue, first.id, allow_failure=True).get_status() == JobStatus.QUEUED


def test_a_job_written_deferred_in_a_transaction_is_settled_after_it(fake_redis):
    queue = Queue("default", connection=fake_redis)
    first = enqueue(queue)
    first.cancel()
    job = queue.create_job("jobs.types.log.write_log", kwargs={"message": "x"}, depends_on=[first.id])
    with fake_redis.pipeline() as pipe:
        pipe.multi()
        queue.enqueue_job(job, pipeline=pipe)
        pipe.execute()
    assert job.get_status() == JobStatus.DEFERRED  # written without looking at its dependency
    assert dependencies.settle(fake_redis, [job.id], Job) == []
    assert job.get_status() == JobStatus.CANCELED


def test_maintenance_settles_a_chain_left_deferred(fake_redis):
    queue = Queue("default", connection=fake_redis)
    first = enqueue(queue)
    chain = [enqueue(queue, first.id)]
    for _ in range(5):
        chain.append(enqueue(queue, chain[-1].id))
    # Failed by a path that settles nothing (a process that died right after recording it).
    fake_redis.hset(first.key, "status", JobStatus.FAILED.value)
    assert all(job.get_status() == JobStatus.DEFERRED for job in chain)
    dependencies.sweep(fake_redis, "default", Job)
    assert all(job.get_status() == JobStatus.CANCELED for job in chain)
    assert chain[-1].get_meta()["error"]["message"].endswith(f"{chain[-2].id} ended canceled.")
