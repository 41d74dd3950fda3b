"""A batch's bookkeeping on fakeredis: an unannounced end is found, a batch ends once, a read
costs two round trips."""

from __future__ import annotations

import time

import redis

from jobs import batches, keys
from jobs.engine.job import Job


def accept(client, count: int, **extra) -> dict:
    answer = client.post("/batches", json={"jobs": [{"type": "log", "message": "x"}] * count, **extra})
    assert answer.status_code == 202, answer.get_json()
    return answer.get_json()


def end_unannounced(connection: redis.Redis, job_ids: list[str], status: str = "finished") -> None:
    """As a dashboard action would: the jobs' status changes, and no one says so."""
    for job_id in job_ids:
        connection.hset(Job.key_for(job_id), "status", status)


def test_the_sweep_ends_a_batch_whose_last_end_was_not_announced_and_only_once(client, fake_redis):
    batch = accept(client, 3)
    end_unannounced(fake_redis, batch["job_ids"][:2])
    later = time.time() + batches.SWEEP_FIRST + 1
    assert batches.sweep(fake_redis, at=later) == 0  # one job still queued
    assert fake_redis.scard(keys.batch_pending(batch["id"])) == 1
    end_unannounced(fake_redis, batch["job_ids"][2:], status="canceled")
    assert batches.sweep(fake_redis, at=later + batches.SWEEP_EVERY + 1) == 1
    assert batches.sweep(fake_redis, at=later + 10 * batches.SWEEP_EVERY) == 0
    view = client.get(f"/batches/{batch['id']}").get_json()
    assert view["done"] and view["counts"]["finished"] == 2 and view["counts"]["canceled"] == 1
    assert fake_redis.zscore(keys.BATCHES_OPEN, batch["id"]) is None


def test_a_read_that_sees_every_job_ended_ends_the_batch(client, fake_redis):
    batch = accept(client, 2)
    end_unannounced(fake_redis, batch["job_ids"])
    fake_redis.delete(Job.key_for(batch["job_ids"][0]))  # gone: counted as ended, expired
    view = client.get(f"/batches/{batch['id']}").get_json()
    assert view["done"] and view["ended_at"] is not None
    assert view["counts"]["finished"] == 1 and view["counts"]["expired"] == 1


def test_each_end_is_counted_once_and_the_batch_ends_once(client, fake_redis):
    batch = accept(client, 2)
    first, second = batch["job_ids"]
    # An end announced before it is recorded (an abandoned job: RQ tells its exception
    # handlers first) does not count until the job's hash shows it.
    fake_redis.hset(Job.key_for(second), "status", "started")
    assert batches._queue_end(fake_redis, batch["id"], second) == 0
    assert fake_redis.sismember(keys.batch_pending(batch["id"]), second)
    end_unannounced(fake_redis, [first])
    end_unannounced(fake_redis, [second], status="failed")
    ended = [
        batches._queue_end(fake_redis, batch["id"], job_id)
        for job_id in (first, first, second, second, first)
    ]
    assert ended == [0, 0, 1, 0, 0]


def test_reading_a_thousand_job_batch_takes_two_round_trips(client, fake_redis, monkeypatch):
    batch = accept(client, 1000)
    trips = []
    execute = redis.client.Pipeline.execute
    monkeypatch.setattr(
        redis.client.Pipeline, "execute", lambda pipe, *a, **k: trips.append(1) or execute(pipe, *a, **k)
    )
    view = batches.read(fake_redis, batch["id"])
    assert view["total"] == 1000 and view["counts"]["queued"] == 1000
    assert len(trips) == 2
