"""The engine's timing rules, without Redis: they must agree with one another."""

from __future__ import annotations

import redis

from jobs.connection import WORKER_BACKOFF_BASE, WORKER_BACKOFF_CAP, WorkerRedis, retries_within
from jobs.engine.queue import Queue
from jobs.engine.worker import Worker
from jobs.settings import Settings


def test_a_workers_socket_timeout_follows_the_maintenance_interval(monkeypatch):
    # RQ sizes it from the intervals it is given in its constructor: ours, not its 10 minutes.
    monkeypatch.setenv("MAINTENANCE_INTERVAL", "10")
    connection = redis.Redis(host="127.0.0.1", port=1)  # never connected
    worker = Worker([Queue("default", connection=connection)], connection=connection, prepare_for_work=False)
    assert worker.maintenance_interval == 10
    assert connection.connection_pool.connection_kwargs["socket_timeout"] == 10 + 10


def waited(retries: int) -> float:
    return sum(min(WORKER_BACKOFF_CAP, WORKER_BACKOFF_BASE * 2**i) for i in range(retries))


def test_a_worker_gives_up_on_redis_before_its_jobs_heartbeat_runs_out(monkeypatch):
    for interval in (1, 5, 30):
        settings = Settings(job_monitoring_interval=interval)
        retries = retries_within(settings.worker_retry_seconds)
        # The last heartbeat was at most one interval ago; retrying must end before it expires.
        assert interval + waited(retries) < settings.heartbeat_ttl, interval
        assert retries >= 3, "a Redis restart of a few seconds is still ridden out"


def test_the_worker_client_retries_within_that_budget(monkeypatch):
    monkeypatch.setenv("JOB_MONITORING_INTERVAL", "5")
    client = WorkerRedis.from_url("redis://127.0.0.1:1/0")
    retry = client.connection_pool.connection_kwargs["retry"]
    assert retry.get_retries() == retries_within(Settings(job_monitoring_interval=5).worker_retry_seconds)
