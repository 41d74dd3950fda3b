"""The reliable dequeue (jobs.engine.queue) on fakeredis: order, atomic hand-over, recovery."""

from __future__ import annotations

import secrets

import pytest
from rq.exceptions import DequeueTimeout

from jobs import keys
from jobs.engine import pause
from jobs.engine.job import Job
from jobs.engine.queue import EmbedQueue, Queue, recover_intermediate
from jobs.engine.worker import Worker


@pytest.fixture
def queues(fake_redis):
    return [Queue(name, connection=fake_redis) for name in ("high", "default", "low")]


def enqueue(queue: Queue, message: str) -> Job:
    return queue.enqueue("jobs.types.log.write_log", message=message)


def test_takes_jobs_in_queue_priority_order(queues, fake_redis):
    high, default, low = queues
    enqueue(low, "l")
    enqueue(default, "d")
    enqueue(high, "h")
    order = []
    for _ in range(3):
        job, queue = Queue.dequeue_any(queues, None, connection=fake_redis)
        order.append((queue.name, job.kwargs["message"]))
    assert order == [("high", "h"), ("default", "d"), ("low", "l")]
    assert Queue.dequeue_any(queues, None, connection=fake_redis) is None


def test_a_taken_job_waits_on_the_intermediate_list(queues, fake_redis):
    job = enqueue(queues[1], "x")
    taken, queue = Queue.dequeue_any(queues, None, connection=fake_redis)
    assert taken.id == job.id
    assert fake_redis.llen(queue.key) == 0
    assert fake_redis.lrange(queue.intermediate_queue_key, 0, -1) == [job.id.encode()]


def test_every_push_signals_an_idle_worker(queues, fake_redis):
    enqueue(queues[0], "x")
    enqueue(queues[2], "y")
    assert fake_redis.llen(keys.wakeup_list("high")) == 1
    assert fake_redis.llen(keys.wakeup_list("low")) == 1
    assert fake_redis.llen(keys.wakeup_list("default")) == 0


def test_blocking_dequeue_times_out(queues, fake_redis):
    with pytest.raises(DequeueTimeout):
        Queue.dequeue_any(queues, 1, connection=fake_redis)


def test_a_job_deleted_while_queued_is_skipped(queues, fake_redis):
    gone = enqueue(queues[0], "gone")
    kept = enqueue(queues[0], "kept")
    gone.delete()
    fake_redis.rpush(queues[0].key, gone.id)  # a stale id left behind
    job, _ = Queue.dequeue_any(queues, None, connection=fake_redis)
    assert job.id == kept.id


def test_a_job_taken_by_a_dead_worker_is_put_back_first(queues, fake_redis):
    default = queues[1]
    lost = enqueue(default, "lost")
    later = enqueue(default, "later")
    Queue.dequeue_any(queues, None, connection=fake_redis)  # a worker takes it, then dies
    intermediate = default.intermediate_queue
    assert recover_intermediate(intermediate, default, older_than=30, now=1000) == []  # first sighting
    assert recover_intermediate(intermediate, default, older_than=30, now=1020) == []
    assert recover_intermediate(intermediate, default, older_than=30, now=1031) == [lost.id]
    assert fake_redis.lrange(default.key, 0, -1) == [lost.id.encode(), later.id.encode()]
    assert fake_redis.llen(default.intermediate_queue_key) == 0
    # The clock starts again for whoever takes it next: RQ's first-seen mark is gone with it.
    assert not fake_redis.exists(intermediate.get_first_seen_key(lost.id))


def test_a_started_job_is_not_put_back(queues, fake_redis):
    default = queues[1]
    job = enqueue(default, "running")
    Queue.dequeue_any(queues, None, connection=fake_redis)
    fake_redis.zadd(default.started_job_registry.key, {f"{job.id}:an-execution": 9e9})
    intermediate = default.intermediate_queue
    assert recover_intermediate(intermediate, default, older_than=0, now=1000) == []
    assert recover_intermediate(intermediate, default, older_than=0, now=2000) == []
    assert fake_redis.llen(default.key) == 0


def test_rqs_maintenance_puts_a_job_back_instead_of_failing_it(queues, fake_redis, monkeypatch):
    # One recovery path: RQ's own clean-up of the intermediate list is ours, with our grace.
    monkeypatch.setenv("INTERMEDIATE_GRACE", "0")
    default = queues[1]
    lost = enqueue(default, "lost")
    Queue.dequeue_any(queues, None, connection=fake_redis)
    worker = Worker(queues, connection=fake_redis, prepare_for_work=False)
    for _ in range(2):  # first sighting, then the put-back
        fake_redis.delete(default.registry_cleaning_key)
        worker.clean_registries()
    assert fake_redis.lrange(default.key, 0, -1) == [lost.id.encode()]
    assert lost.get_status() == "queued"


def test_an_embed_dequeue_takes_a_batch_from_one_queue(fake_redis, monkeypatch):
    monkeypatch.setenv("EMBED_BATCH_JOBS", "3")
    high, default = (EmbedQueue(name, connection=fake_redis) for name in ("embed-high", "embed-default"))
    first_high = enqueue(high, "h")
    queued = [enqueue(default, f"d{i}") for i in range(4)]
    job, queue = EmbedQueue.dequeue_any([high, default], None, connection=fake_redis)
    assert (queue.name, job.id, job.taken_with) == ("embed-high", first_high.id, [])  # never mixes queues
    job, queue = EmbedQueue.dequeue_any([high, default], None, connection=fake_redis)
    assert [j.id for j in [job, *job.taken_with]] == [j.id for j in queued[:3]]
    assert [j.kwargs["message"] for j in job.taken_with] == ["d1", "d2"]  # read with the take
    assert fake_redis.lrange(queue.intermediate_queue_key, 0, -1) == [j.id.encode() for j in queued[:3]]
    assert fake_redis.lrange(queue.key, 0, -1) == [queued[3].id.encode()]


def test_a_batch_stops_growing_at_its_byte_budget(fake_redis, monkeypatch):
    monkeypatch.setattr(EmbedQueue, "BATCH_BYTES", 3000)
    queue = EmbedQueue("embed-default", connection=fake_redis)
    for _ in range(5):
        enqueue(queue, secrets.token_urlsafe(1200))  # about 1,200 bytes of data, compressed or not
    job, _ = EmbedQueue.dequeue_any([queue], None, connection=fake_redis)
    assert len(job.taken_with) == 2  # the third job's data passes 3000 bytes: it closes the batch
    assert fake_redis.llen(queue.key) == 2


def test_the_general_queue_takes_one_job_at_a_time(queues, fake_redis):
    for i in range(3):
        enqueue(queues[1], str(i))
    job, _ = Queue.dequeue_any(queues, None, connection=fake_redis)
    assert job.taken_with == []
    assert fake_redis.llen(queues[1].key) == 2


def test_a_paused_queue_gives_no_job_until_it_is_resumed(queues, fake_redis):
    high, default, _ = queues
    held = enqueue(high, "held")
    other = enqueue(default, "other")
    pause.pause(fake_redis, "high", by="ops")
    job, queue = Queue.dequeue_any(queues, None, connection=fake_redis)
    assert (queue.name, job.id) == ("default", other.id)  # the lower priority, not the paused one
    assert Queue.dequeue_any(queues, None, connection=fake_redis) is None
    assert fake_redis.lrange(high.key, 0, -1) == [held.id.encode()]
    fake_redis.delete(keys.wakeup_list("high"))
    pause.resume(fake_redis, "high")
    assert fake_redis.llen(keys.wakeup_list("high")) == 1  # idle workers wake at once
    job, queue = Queue.dequeue_any(queues, None, connection=fake_redis)
    assert (queue.name, job.id) == ("high", held.id)


def test_an_embedder_takes_no_batch_off_a_paused_queue(fake_redis, monkeypatch):
    monkeypatch.setenv("EMBED_BATCH_JOBS", "3")
    default, low = (EmbedQueue(name, connection=fake_redis) for name in ("embed-default", "embed-low"))
    held = [enqueue(default, f"d{i}") for i in range(3)]
    open_ = [enqueue(low, f"l{i}") for i in range(2)]
    pause.pause(fake_redis, "embed-default", by="ops")
    job, queue = EmbedQueue.dequeue_any([default, low], None, connection=fake_redis)
    assert (queue.name, [j.id for j in [job, *job.taken_with]]) == ("embed-low", [j.id for j in open_])
    assert EmbedQueue.dequeue_any([default, low], None, connection=fake_redis) is None
    pause.resume(fake_redis, "embed-default")
    job, queue = EmbedQueue.dequeue_any([default, low], None, connection=fake_redis)
    assert (queue.name, [j.id for j in [job, *job.taken_with]]) == ("embed-default", [j.id for j in held])
