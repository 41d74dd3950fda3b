"""Worker classes compared on the same log jobs: stock forking RQ, RQ's SimpleWorker, ours.

    .venv/bin/python -m bench.worker_classes [--jobs 400] [--workers 2]

Each class drains the same number of `log` jobs, queued beforehand, with the same number of
`rq worker-pool` processes in burst mode, every one started through bench.stock_worker so
that the job's module is imported before the workers fork (RQ's docs advise preloading).
Throughput is jobs divided by the span from the first start to the last end (worker start-up
excluded). Ratios are against stock `rq.Worker`: a fork per job, RQ's default and its
isolation; `SimpleWorker` runs every job in the worker process itself, with none.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from rq import Queue as RQQueue
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from bench.common import bench_parser, database, result
from jobs.engine.job import Job
from jobs.engine.queue import Queue
from scripts.processes import ROOT
from scripts.stack import TestDatabase, procfile_env

CLASSES = {
    "stock rq.Worker (fork per job)": ("rq.Worker", "rq.job.Job", "rq.Queue"),
    "rq.SimpleWorker (no fork)": ("rq.SimpleWorker", "rq.job.Job", "rq.Queue"),
    "afterward jobs.engine.worker.Worker": (
        "jobs.engine.worker.Worker",
        "jobs.engine.job.Job",
        "jobs.engine.queue.Queue",
    ),
}


def run(
    label: str, classes: tuple[str, str, str], db: TestDatabase, jobs: int, workers: int, tmp: Path
) -> float:
    db.flush()
    connection = db.client()
    ours = classes[0].startswith("jobs.")
    queue = (Queue if ours else RQQueue)("default", connection=connection, serializer=JSONSerializer)
    ids = [queue.enqueue("jobs.types.log.write_log", message=f"bench {i}").id for i in range(jobs)]
    worker_class, job_class, queue_class = classes
    command = [
        sys.executable,
        "-m",
        "bench.stock_worker",
        "worker-pool",
        "default",
        "--burst",
        "--num-workers",
        str(workers),
        "--worker-class",
        worker_class,
        "--job-class",
        job_class,
        "--queue-class",
        queue_class,
        "--serializer",
        "json",
    ]
    env = procfile_env(db.url, tmp, LOG_FILE=str(tmp / f"{worker_class}.log"))
    subprocess.run(
        command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    fetched = (Job if ours else RQJob).fetch_many(ids, connection=connection, serializer=JSONSerializer)
    done = [job for job in fetched if job is not None and job.get_status(refresh=False) == "finished"]
    assert len(done) == jobs, f"{label}: {len(done)} of {jobs} finished"
    span = (max(j.ended_at for j in done) - min(j.started_at for j in done)).total_seconds()
    return jobs / span


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        rates = {
            label: run(label, classes, db, args.jobs, args.workers, Path(tmp))
            for label, classes in CLASSES.items()
        }
    baseline = next(iter(rates.values()))
    print(f"{args.jobs} log jobs queued beforehand, {args.workers} worker processes, modules preloaded")
    for label, rate in rates.items():
        print(f"  {label:36s} {rate:8.1f} jobs/s   {rate / baseline:5.2f}x stock")
    labels = list(rates)
    result(
        "worker_classes",
        baseline=f"{labels[0]}: {baseline:.1f} jobs/s",
        simple=f"{labels[1]}: {rates[labels[1]]:.1f} jobs/s",
        ours=f"{rates[labels[2]]:.1f} jobs/s",
        ratio=round(rates[labels[2]] / baseline, 2),
    )


if __name__ == "__main__":
    main()
