"""The engine's timing rules, without Redis: they must agree with one another."""

from __future__ import annotations

import os
import signal
import sys
import threading

import redis
from rq.worker import WorkerStatus

from jobs.connection import WORKER_BACKOFF_BASE, WORKER_BACKOFF_CAP, WorkerRedis, retries_within
from jobs.engine.horse import RETIRING, Horse
from jobs.engine.queue import STOPPING, Queue
from jobs.engine.worker import Worker
from jobs.settings import Settings


def test_an_idle_worker_heartbeats_as_often_as_a_busy_one(monkeypatch):
    # Its wait for a job ends every JOB_MONITORING_INTERVAL, and RQ heartbeats between two
    # waits: a worker is counted dead after as long as a running job's heartbeat lasts.
    monkeypatch.setenv("MAINTENANCE_INTERVAL", "10")
    monkeypatch.setenv("JOB_MONITORING_INTERVAL", "5")
    connection = redis.Redis(host="127.0.0.1", port=1)  # never connected
    worker = Worker([Queue("default", connection=connection)], connection=connection, prepare_for_work=False)
    assert worker.dequeue_timeout == 5
    assert 2 * worker.dequeue_timeout < Settings(job_monitoring_interval=5).heartbeat_ttl


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


def test_a_stop_signal_may_interrupt_its_own_handler_anywhere(monkeypatch):
    # A platform's SIGTERM and the worker pool's SIGINT arrive together: the second handler run
    # can start between any two lines of the first. Run it at each one; none may wait on the
    # first (a lock it holds) or talk to Redis meanwhile.
    connection = redis.Redis(host="127.0.0.1", port=1)  # never connected
    worker = Worker([Queue("default", connection=connection)], connection=connection, prepare_for_work=False)
    worker._state = WorkerStatus.BUSY  # a job is running
    worker.pid = os.getpid()
    commands: list[tuple] = []
    monkeypatch.setattr(connection, "execute_command", lambda *args, **kwargs: commands.append(args))
    monkeypatch.setattr(connection, "pipeline", lambda *args, **kwargs: commands.append(("pipeline",)))
    installed: list[tuple] = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.append((signum, handler)))
    interruptions = []

    def interrupt(frame, event, arg):
        if event == "line":
            interruptions.append(frame.f_lineno)
            worker.request_stop(signal.SIGINT, None)  # runs untraced, like a handler, to its end
        return interrupt

    def first_signal() -> None:
        sys.settrace(interrupt)
        try:
            worker.request_stop(signal.SIGTERM, None)
        finally:
            sys.settrace(None)

    try:
        handler = threading.Thread(target=first_signal, daemon=True)
        handler.start()
        handler.join(timeout=10)
        assert not handler.is_alive(), "the stop handler waits on itself"
        assert len(interruptions) >= 5
        assert worker._stop_requested and STOPPING.is_set() and worker._shutdown_deadline is not None
        assert commands == [], "a signal handler must not talk to Redis"
        assert {handler for _, handler in installed} == {worker.request_force_stop}
    finally:
        STOPPING.clear()


def test_a_replaced_work_horse_leaves_no_descriptor_open_in_its_worker():
    # A horse is replaced after every job that fails: a worker that kept its pipes would run
    # out of descriptors after a few hundred failures.
    def retire_at_once(orders, reports):
        reports.send_bytes(RETIRING + b" done here")

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        horse = Horse(retire_at_once)
        assert horse.wait_report(timeout=10) == RETIRING + b" done here"
        assert horse.wait_report(timeout=10) == b""  # gone
        assert horse.reap() == 0
        del horse  # what the worker does with a horse it buried
    assert len(os.listdir("/proc/self/fd")) == before
