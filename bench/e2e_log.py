"""1. End to end: each client submits a log job and waits for it to finish, again and again.

    .venv/bin/python -m bench.e2e_log [--jobs 2000] [--clients 16] [--workers 2]

Afterward, used as the README shows: the Procfile's web process (2 gunicorn processes) and
`rq worker-pool` with `--workers` workers, every setting at its default (rate limit
included); each of `--clients` client threads has an API key of its own, POSTs a job with
it and long-polls the job's status URL (`?wait=30`) until the job ends, then submits the next.

The HTTP ceiling: the same client loop against a bare Flask app under the same gunicorn
settings that answers the POST and the GET with no queue at all (bench.ceiling_app).

Stock RQ at its best documented setting: `--workers` `rq worker` processes (a worker-pool)
with the job's module imported before they fork (bench.stock_worker: RQ's docs advise
preloading), RQ's default serializer; each client thread calls `queue.enqueue` and waits
with `job.latest_result(timeout=30)`, RQ's own blocking wait. Also RQ's `SimpleWorker`
(no fork per job), the same way.

The clock runs from the first submission until every client has seen its last job end.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import requests
from rq import Queue

from bench.common import (
    ClientKeys,
    bench_parser,
    database,
    env_for,
    median,
    ms,
    percentile,
    result,
    run_clients,
    service,
)
from scripts.embedded_redis import free_port
from scripts.processes import ROOT, Process, wait_until
from scripts.stack import serves

TERMINAL = {"finished", "failed", "canceled", "stopped"}
BASELINE = "stock rq.Worker, preloaded"
STOCK = {BASELINE: "rq.Worker", "rq.SimpleWorker": "rq.SimpleWorker"}
OURS = "Afterward, API keys, long polls"
CEILING = "HTTP ceiling: bare Flask, no queue"


def afterward(db, tmp: Path, jobs: int, clients: int, workers: int) -> tuple[float, list[float]]:
    keys = ClientKeys(clients)
    env = env_for(db, tmp, API_KEYS=keys.setting)

    def submit_and_wait(session: requests.Session, i: int) -> None:
        headers = keys.headers(session)
        response = session.post(
            web.url("/jobs/log"), json={"message": f"job {i}"}, headers=headers, timeout=30
        )
        assert response.status_code == 202, response.text
        location = web.url(response.headers["Location"])
        while True:
            view = session.get(location, params={"wait": 30}, headers=headers, timeout=60).json()
            if view["status"] in TERMINAL:
                assert view["status"] == "finished", view
                return

    with service(env, tmp, workers=workers) as web:
        started = time.perf_counter()
        latencies = run_clients(clients, jobs, submit_and_wait)
        return jobs / (time.perf_counter() - started), latencies


def ceiling(db, tmp: Path, jobs: int, clients: int) -> tuple[float, list[float]]:
    """The same client loop against bench.ceiling_app: HTTP with no queue behind it."""
    port = free_port()
    env = dict(env_for(db, tmp), HOST="127.0.0.1", PORT=str(port))
    app = Process(
        "ceiling", "gunicorn --config gunicorn.conf.py 'bench.ceiling_app:create_app()'", env, tmp / "c.log"
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: serves(app, port, base + "/jobs/x"), what="the ceiling app", process=app)

        def submit_and_wait(session: requests.Session, i: int) -> None:
            response = session.post(base + "/jobs/log", json={"message": f"job {i}"}, timeout=30)
            view = session.get(base + response.headers["Location"], params={"wait": 30}, timeout=60).json()
            assert view["status"] == "finished", view

        started = time.perf_counter()
        latencies = run_clients(clients, jobs, submit_and_wait)
        return jobs / (time.perf_counter() - started), latencies
    finally:
        app.kill()


def stock(
    db, tmp: Path, jobs: int, clients: int, workers: int, worker_class: str
) -> tuple[float, list[float]]:
    env = env_for(db, tmp)
    command = (
        f"{sys.executable} -m bench.stock_worker worker-pool default "
        f"--num-workers {workers} --worker-class {worker_class}"
    )
    pool = Process("stock", command, env, tmp / f"stock-{worker_class}.log", cwd=ROOT)
    connection = db.client()
    try:
        wait_until(lambda: connection.scard("rq:workers") >= workers, what="stock workers", process=pool)
        queue = Queue("default", connection=connection)

        def submit_and_wait(session: requests.Session, i: int) -> None:
            job = queue.enqueue("jobs.types.log.write_log", message=f"job {i}")
            outcome = job.latest_result(timeout=30)
            assert outcome is not None and outcome.type == outcome.Type.SUCCESSFUL, outcome

        started = time.perf_counter()
        latencies = run_clients(clients, jobs, submit_and_wait)
        return jobs / (time.perf_counter() - started), latencies
    finally:
        pool.kill()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    runs = {}
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        for label, worker_class in STOCK.items():
            runs[label] = stock(db, Path(tmp), args.jobs, args.clients, args.workers, worker_class)
            db.flush()
        runs[OURS] = afterward(db, Path(tmp), args.jobs, args.clients, args.workers)
        runs[CEILING] = ceiling(db, Path(tmp), args.jobs, args.clients)
    baseline = runs[BASELINE][0]
    print(
        f"end to end: {args.jobs} log jobs, {args.clients} clients each waiting for its job, "
        f"{args.workers} worker processes"
    )
    for label, (rate, latencies) in runs.items():
        print(
            f"  {label:34s} {rate:7.1f} jobs/s  {rate / baseline:5.2f}x stock   submit -> finished "
            f"p50 {ms(median(latencies))}, p95 {ms(percentile(latencies, 0.95))}"
        )
    ours = runs[OURS][0]
    ceiling_ratio = runs[CEILING][0] / baseline
    note = (
        f"a bare Flask app answering the same POST and GET pairs with no queue at all reaches "
        f"{ceiling_ratio:.2f}x stock here, so 5x stock is above what any service answering these "
        f"requests can reach on this machine"
        if ceiling_ratio < 5
        else ""
    )
    result(
        "e2e_log",
        baseline=f"{BASELINE}: {baseline:.1f} jobs/s",
        simple=f"rq.SimpleWorker: {runs['rq.SimpleWorker'][0]:.1f} jobs/s",
        ceiling=f"{CEILING}: {runs[CEILING][0]:.1f} pairs/s, ours {ours / runs[CEILING][0]:.2f}x it",
        ours=f"{ours:.1f} jobs/s",
        ratio=round(ours / baseline, 2),
        note=note,
    )
    result(
        "e2e_log vs HTTP ceiling",
        baseline=f"{CEILING}: {runs[CEILING][0]:.1f} POST + GET pairs/s",
        ours=f"{ours:.1f} jobs/s",
        ratio=round(ours / runs[CEILING][0], 2),
    )


if __name__ == "__main__":
    main()
