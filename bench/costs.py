"""Where a job's time goes: Redis commands, round trips and CPU per job, stock RQ and ours.

    .venv/bin/python -m bench.costs [--jobs 500] [--clients 8]

Stock RQ: the jobs are enqueued with `queue.enqueue` and run by a preloaded `rq worker-pool`
of 2 workers (bench.stock_worker); the bench waits by counting the finished registry twice a
second (those few commands are subtracted). That is enqueue + run, nothing else.
Afterward: the web process (2 gunicorn processes) and a worker-pool of 2 workers, every
setting at its default, API keys on; each client POSTs a log job with an API key and an
Idempotency-Key, then waits with one status request (`GET <Location>?wait=30`).

Per job: Redis commands (INFO commandstats), round trips (Redis's read events, which is what
one request or one pipeline costs it), and CPU milliseconds spent by each process type (the
client threads included), from psutil before and after.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import redis
import requests
from rq import Queue

from bench.common import ClientKeys, bench_parser, env_for, result, run_clients, service
from scripts.embedded_redis import EmbeddedRedis
from scripts.processes import ROOT, Process, wait_until
from scripts.stack import TestDatabase


def cpu_seconds(root: psutil.Process) -> float:
    """CPU time of a process and everything below it, children that ended included; for this
    (the benchmark's) process, its own time only: its client threads. The services it
    started are counted under their own names."""
    if root.pid == os.getpid():
        times = root.cpu_times()
        return times.user + times.system
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


class Meter:
    """Redis commands, read events and CPU of named process trees, between start() and stop()."""

    def __init__(self, connection: redis.Redis, processes: dict[str, Callable[[], psutil.Process]]) -> None:
        self.connection = connection
        self.processes = processes

    def _read(self) -> tuple[int, int, dict[str, float]]:
        stats = self.connection.info("stats")
        cpu = {name: cpu_seconds(find()) for name, find in self.processes.items()}
        return stats["total_commands_processed"], stats["total_reads_processed"], cpu

    def start(self) -> None:
        self._before = self._read()

    def stop(self, jobs: int, overhead: int = 0) -> dict[str, float]:
        after = self._read()
        # Each INFO read costs one command and one read event of its own.
        commands = after[0] - self._before[0] - overhead - 1
        reads = after[1] - self._before[1] - overhead - 1
        figures = {"Redis commands": commands / jobs, "Redis round trips": reads / jobs}
        for name in self.processes:
            figures[f"CPU ms, {name}"] = (after[2][name] - self._before[2][name]) * 1000 / jobs
        return figures


def stock(server: EmbeddedRedis, tmp: Path, jobs: int) -> dict[str, float]:
    db = TestDatabase(server.base_url).acquire()
    env = env_for(db, tmp)
    command = f"{sys.executable} -m bench.stock_worker worker-pool default --num-workers 2"
    pool = Process("stock", command, env, tmp / "stock.log", cwd=ROOT)
    connection = db.client()
    try:
        wait_until(lambda: connection.scard("rq:workers") >= 2, what="stock workers", process=pool)
        queue = Queue("default", connection=connection)
        meter = Meter(
            connection,
            {
                "client": psutil.Process,
                "worker": lambda: psutil.Process(pool.pid),
                "Redis": lambda: psutil.Process(server.process.pid),
            },
        )
        time.sleep(1)  # let the workers settle into waiting
        meter.start()
        for i in range(jobs):
            queue.enqueue("jobs.types.log.write_log", message=f"job {i}")
        polls = 0
        while queue.finished_job_registry.count < jobs:
            polls += 2  # ZREMRANGEBYSCORE + ZCARD
            time.sleep(0.5)
        polls += 2
        return meter.stop(jobs, overhead=polls)
    finally:
        pool.kill()
        db.release()


def afterward(server: EmbeddedRedis, tmp: Path, jobs: int, clients: int) -> dict[str, float]:
    db = TestDatabase(server.base_url).acquire()
    keys = ClientKeys(clients)
    env = env_for(db, tmp, API_KEYS=keys.setting)

    def submit_and_wait(session: requests.Session, i: int) -> None:
        headers = {**keys.headers(session), "Idempotency-Key": uuid.uuid4().hex}
        response = session.post(
            web.url("/jobs/log"), json={"message": f"job {i}"}, headers=headers, timeout=30
        )
        assert response.status_code == 202, response.text
        view = session.get(
            web.url(response.headers["Location"]), params={"wait": 30}, headers=headers, timeout=60
        )
        assert view.json()["status"] == "finished", view.text

    try:
        with service(env, tmp, workers=2) as web:
            pool = next(p for p in psutil.Process().children() if "worker-pool" in " ".join(p.cmdline()))
            run_clients(clients, min(50, jobs), submit_and_wait)  # warm up
            meter = Meter(
                db.client(),
                {
                    "client": psutil.Process,
                    "web": lambda: psutil.Process(web.process.pid),
                    "worker": lambda: pool,
                    "Redis": lambda: psutil.Process(server.process.pid),
                },
            )
            time.sleep(1)
            meter.start()
            run_clients(clients, jobs, submit_and_wait)
            return meter.stop(jobs)
    finally:
        db.release()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis", appendonly=False) as server:
        version = redis.Redis.from_url(server.url).info("server")["redis_version"]
        print(f"Redis {version}: a private redis-server")
        baseline = stock(server, Path(tmp), args.jobs)
        ours = afterward(server, Path(tmp), args.jobs, args.clients)
    print(f"per log job, {args.jobs} jobs ({args.clients} clients for Afterward), 2 worker processes each")
    print(f"  {'':26s} {'stock RQ: enqueue + run':>26s} {'Afterward: POST + one wait':>28s}")
    for name in sorted(set(baseline) | set(ours), key=lambda n: (not n.startswith("Redis"), n)):
        stock_value = f"{baseline[name]:.1f}" if name in baseline else "-"
        ours_value = f"{ours[name]:.1f}" if name in ours else "-"
        print(f"  {name:26s} {stock_value:>26s} {ours_value:>28s}")
    for name in ("Redis commands", "Redis round trips"):
        result(
            f"costs: {name} per job",
            baseline=f"stock enqueue + run: {baseline[name]:.1f}",
            ours=f"{ours[name]:.1f} (POST + one wait, keys, limits, idempotency)",
            ratio=round(ours[name] / baseline[name], 2),
        )


if __name__ == "__main__":
    main()
