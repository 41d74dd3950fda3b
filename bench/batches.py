"""Batches end to end: jobs/s from submission until every job of the batch has finished.

    .venv/bin/python -m bench.batches [--jobs 6000] [--batch 100] [--clients 8] [--workers 2]

Afterward, as its users run it: the Procfile's web process and `rq worker-pool` with
`--workers` workers, every limit at its default (rate limit, the key's share); one API key
shared by every client. Each of `--clients` client threads POSTs `--batch` log jobs to
`/batches`, long-polls the batch (`GET /batches/<id>?wait=30`) until it is done, checks that
every job finished, and sends the next.

Stock RQ at its best documented setting, on the same private redis-server in the same run:
`--workers` `rq worker` processes (a worker-pool) with the job's module imported before they
fork (bench.stock_worker), RQ's default serializer; each client thread enqueues `--batch` jobs
in one round trip with `Queue.enqueue_many` (each made by `Queue.prepare_data`), reads the
last one's status every 20 ms until it has ended (workers take a queue in order), then every
status in one pipeline (again every 20 ms until all have finished), and sends the next.

The clock runs from the first submission until every client has seen its last batch done.
Target: >= 2x stock.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import requests
from rq import Queue

from bench.common import bench_parser, database, env_for, result, run_clients, service
from scripts.processes import ROOT, Process, wait_until

BASELINE = "stock RQ enqueue_many, preloaded worker-pool"
OURS = "Afterward POST /batches + ?wait"
API_KEY = "bench-batches-shared-key-0123456789"
# Seconds between a stock client's looks at its jobs' statuses.
STOCK_POLL = 0.02


def afterward(db, tmp: Path, jobs: int, batch: int, clients: int, workers: int) -> float:
    env = env_for(db, tmp, API_KEYS=API_KEY)
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def submit_and_wait(session: requests.Session, i: int) -> None:
        body = {"jobs": [{"type": "log", "message": f"batch {i} job {n}"} for n in range(batch)]}
        response = session.post(web.url("/batches"), json=body, headers=headers, timeout=60)
        assert response.status_code == 202, response.text
        location = web.url(response.headers["Location"])
        while True:
            view = session.get(location, params={"wait": 30}, headers=headers, timeout=60).json()
            if view["done"]:
                assert view["counts"]["finished"] == batch, view
                return

    with service(env, tmp, workers=workers) as web:
        run_clients(clients, clients, submit_and_wait)  # warm up
        started = time.perf_counter()
        run_clients(clients, jobs // batch, submit_and_wait)
        return (jobs // batch) * batch / (time.perf_counter() - started)


def stock(db, tmp: Path, jobs: int, batch: int, clients: int, workers: int) -> float:
    env = env_for(db, tmp)
    command = f"{sys.executable} -m bench.stock_worker worker-pool default --num-workers {workers}"
    pool = Process("stock", command, env, tmp / "stock-batches.log", cwd=ROOT)
    connection = db.client()
    try:
        wait_until(lambda: connection.scard("rq:workers") >= workers, what="stock workers", process=pool)
        queue = Queue("default", connection=connection)

        def submit_and_wait(session: requests.Session, i: int) -> None:
            made = queue.enqueue_many(
                [
                    Queue.prepare_data("jobs.types.log.write_log", kwargs={"message": f"batch {i} job {n}"})
                    for n in range(batch)
                ]
            )
            # Workers take a queue in order: the last job ends about last. Its status alone
            # until it has ended, then all of them in one pipeline (again, if need be).
            keys = [job.key for job in made]
            while connection.hget(keys[-1], "status") not in (b"finished", b"failed"):
                time.sleep(STOCK_POLL)
            while True:
                with connection.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.hget(key, "status")
                    statuses = pipe.execute()
                if all(status in (b"finished", b"failed") for status in statuses):
                    assert all(status == b"finished" for status in statuses), statuses
                    return
                time.sleep(STOCK_POLL)

        run_clients(clients, clients, submit_and_wait)  # warm up
        started = time.perf_counter()
        run_clients(clients, jobs // batch, submit_and_wait)
        return (jobs // batch) * batch / (time.perf_counter() - started)
    finally:
        pool.kill()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        baseline = stock(db, Path(tmp), args.jobs, args.batch, args.clients, args.workers)
        db.flush()
        ours = afterward(db, Path(tmp), args.jobs, args.batch, args.clients, args.workers)
    print(
        f"batches end to end: {args.jobs} log jobs in batches of {args.batch}, {args.clients} clients "
        f"each waiting for its batch, {args.workers} worker processes"
    )
    for label, rate in ((BASELINE, baseline), (OURS, ours)):
        print(f"  {label:46s} {rate:7.1f} jobs/s  {rate / baseline:5.2f}x stock")
    print(f"  ratio: {ours / baseline:.2f}x stock (target >= 2x)")
    result(
        "batches",
        baseline=f"{BASELINE}: {baseline:.1f} jobs/s",
        ours=f"{ours:.1f} jobs/s",
        ratio=round(ours / baseline, 2),
    )


if __name__ == "__main__":
    main()
