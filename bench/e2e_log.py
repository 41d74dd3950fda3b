"""1. End to end: log jobs POSTed over HTTP until all finished, vs stock RQ with the same workers.

    .venv/bin/python -m bench.e2e_log [--jobs 2000] [--clients 16] [--workers 2]

Afterward: the Procfile's web process (2 gunicorn processes) and `rq worker-pool` with
`--workers` workers; `--clients` threads POST the jobs; the clock runs from the first POST
until every job is `finished`. Stock: the same jobs enqueued straight into RQ (`queue.enqueue`,
RQ's default serializer) and run by `--workers` stock `rq worker` processes (default class);
the clock runs from the first enqueue until every job is finished. Target: >= 5x stock.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rq import Queue

from bench.common import bench_parser, database, env_for, run_clients, service, wait_finished
from scripts.processes import Process, wait_until


def afterward(db, tmp: Path, jobs: int, clients: int, workers: int) -> float:
    env = env_for(db, tmp, RATE_LIMIT="off")
    with service(env, tmp, workers=workers) as web:
        ids: list[str] = []
        started = time.perf_counter()
        run_clients(
            clients,
            jobs,
            lambda s, i: ids.append(
                s.post(web.url("/jobs/log"), json={"message": f"job {i}"}, timeout=30).json()["id"]
            ),
        )
        wait_finished(db.client(), ids)
        return jobs / (time.perf_counter() - started)


def stock(db, tmp: Path, jobs: int, workers: int) -> float:
    env = env_for(db, tmp)
    processes = [
        Process(f"stock-{n}", "rq worker default", env, tmp / f"stock-{n}.log") for n in range(workers)
    ]
    connection = db.client()
    try:
        wait_until(lambda: connection.scard("rq:workers") >= workers, timeout=60, what="stock workers")
        queue = Queue("default", connection=connection)
        started = time.perf_counter()
        ids = [queue.enqueue("jobs.types.log.write_log", message=f"job {i}").id for i in range(jobs)]
        wait_finished(connection, ids)
        return jobs / (time.perf_counter() - started)
    finally:
        for process in processes:
            process.kill()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        baseline = stock(db, Path(tmp), args.jobs, args.workers)
        db.flush()
        ours = afterward(db, Path(tmp), args.jobs, args.clients, args.workers)
    print(f"end to end, {args.jobs} log jobs, {args.workers} worker processes")
    print(f"  stock RQ (enqueue + rq worker)          {baseline:8.1f} jobs/s")
    print(f"  Afterward (HTTP POST + worker-pool)     {ours:8.1f} jobs/s")
    print(f"  ratio: {ours / baseline:.2f}x stock (target >= 5x)")


if __name__ == "__main__":
    main()
