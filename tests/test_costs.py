"""What a job costs in Redis on the worker side, against stock RQ on the same Redis, same jobs.

The README says a worker reads a job with its dequeue, starts it in one round trip and
finishes a plain success in one transaction, where stock RQ spends many more. Counted with
Redis's own statistics (commands processed, read events), not timed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import redis
from rq import Queue as RQQueue

from jobs import keys
from jobs.engine.queue import Queue
from tests.support import ROOT, Process, base_env, start_workers, wait_until

pytestmark = pytest.mark.integration

JOBS = 200


def worker_costs(connection: redis.Redis, queue: RQQueue) -> tuple[float, float]:
    """Redis commands and round trips per job while the running workers drain JOBS log jobs."""
    time.sleep(1)  # the workers settle into waiting
    before = connection.info("stats")
    with connection.pipeline() as pipe:
        for i in range(JOBS):
            queue.enqueue("jobs.types.log.write_log", message=f"job {i}", pipeline=pipe)
        enqueue_commands = len(pipe.command_stack) + 2  # with MULTI and EXEC
        pipe.execute()
    polls = 0
    while queue.finished_job_registry.count < JOBS:
        polls += 2  # ZREMRANGEBYSCORE + ZCARD, in one read each
        time.sleep(0.05)
        assert polls < 2000, "the jobs did not finish"
    after = connection.info("stats")
    own_commands = enqueue_commands + polls + 2  # and the two INFOs
    own_reads = 1 + polls + 2
    commands = after["total_commands_processed"] - before["total_commands_processed"] - own_commands
    reads = after["total_reads_processed"] - before["total_reads_processed"] - own_reads
    return commands / JOBS, reads / JOBS


def test_a_job_costs_our_worker_far_fewer_round_trips_than_stock_rq(real_redis, env, proc_dir: Path):
    url = env["REDIS_URL"]
    stock_env = base_env(url, proc_dir)
    stock = Process(
        "stock",
        f"{sys.executable} -m bench.stock_worker worker-pool default --num-workers 1",
        stock_env,
        proc_dir / "stock.log",
        cwd=ROOT,
    )
    try:
        wait_until(lambda: real_redis.scard("rq:workers") >= 1, what="the stock worker", process=stock)
        stock_commands, stock_reads = worker_costs(real_redis, RQQueue("default", connection=real_redis))
    finally:
        stock.kill()
    real_redis.flushdb()
    ours = start_workers(env, proc_dir, count=1)
    try:
        wait_until(lambda: real_redis.scard("rq:workers") >= 1, what="our worker", process=ours)
        commands, reads = worker_costs(real_redis, Queue("default", connection=real_redis))
    finally:
        ours.kill()
    print(
        f"per job: stock {stock_commands:.1f} commands, {stock_reads:.1f} round trips; "
        f"ours {commands:.1f}, {reads:.1f}"
    )
    # Dequeue with the job's hash, start, finish, idle: about 4 round trips; stock RQ about 27.
    assert reads <= 8 < stock_reads / 2
    assert commands < stock_commands


def test_a_drained_worker_waits_quietly_and_says_it_is_idle(real_redis, env, proc_dir: Path):
    """A burst leaves a wake-up signal per job pushed while the worker was busy; once the
    queue is empty they are stale, and a worker that found nothing to take must not go
    through them one by one (a take and a wait each, two round trips per job of the burst).
    Its state, written only when it starts waiting (none between jobs taken back to back),
    reads idle."""
    ours = start_workers(env, proc_dir, count=1)
    try:
        wait_until(lambda: real_redis.scard("rq:workers") >= 1, what="our worker", process=ours)
        worker_key = real_redis.smembers("rq:workers").pop()
        time.sleep(1)  # the worker settles into waiting
        real_redis.config_resetstat()
        queue = Queue("default", connection=real_redis)
        with real_redis.pipeline() as pipe:
            for i in range(JOBS):
                queue.enqueue("jobs.types.log.write_log", message=f"job {i}", pipeline=pipe)
            pipe.execute()
        wait_until(lambda: queue.finished_job_registry.count == JOBS, what="the burst to finish")
        time.sleep(1)
        waits = real_redis.info("commandstats").get("cmdstat_blpop", {}).get("calls", 0)
        # The wait the burst ended, the one after it, a poll a second: not one per job.
        assert waits <= 6, f"{waits} waits for {JOBS} jobs"
        assert real_redis.llen(keys.wakeup_list("default")) == 0
        assert real_redis.hget(worker_key, "state") == b"idle"
    finally:
        ours.kill()
