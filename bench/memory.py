"""Memory per process type: resident (RSS) and proportional (PSS) memory, as deployed.

    .venv/bin/python -m bench.memory [--documents 0,100000] [--concurrency 1,2,4]

For each index size it fills a private Redis with that many documents (bench.index's
clustered synthetic vectors, ~100-character texts, through the store's Lua upsert) and writes
a snapshot, as a running service would, into the INDEX_DIR the web processes share. Then,
for each WEB_CONCURRENCY, it starts the Procfile's web process with
SEARCH_WARMUP=1 (each gunicorn worker loads the encoder and its replica before it takes
requests), searches once through every worker, and reads every process of the tree: the
gunicorn arbiter and its workers. The `worker` and `embedder` process types (one worker
each; the embedder's work-horse holds the model) are measured once per index size, after a
job of their kind ran.

PSS splits each shared page among the processes that map it, so the PSS of a process tree
is what it costs the host; RSS counts every shared page in every process. "Largest private"
is the largest RSS of one process without the snapshot files it maps (shared by the host).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import psutil
import requests

import jobs  # noqa: F401 - pins thread counts before numpy work starts
from bench.common import bench_parser, database, result
from bench.index import fill, snapshot_rss
from jobs.index.embedding import get_encoder
from jobs.index.replica import Replica
from jobs.index.store import DocumentStore
from scripts.processes import Process, wait_until
from scripts.stack import WebService, procfile_env, start_workers

MB = 2**20
# What one web process may hold besides the snapshot pages the host's processes share.
WEB_BUDGET_MB = 250


def tree(root_pid: int) -> list[psutil.Process]:
    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


def footprint(processes: list[psutil.Process]) -> tuple[float, float, float, float]:
    """Total RSS, total PSS, the largest single RSS and the largest RSS without the snapshot's
    mapped files, of `processes`, in MB."""
    rss = pss = largest = private = 0.0
    for process in processes:
        info = process.memory_full_info()
        rss += info.rss / MB
        pss += info.pss / MB
        largest = max(largest, info.rss / MB)
        private = max(private, info.rss / MB - snapshot_rss(process.pid))
    return rss, pss, largest, private


def measure_web(
    env: dict[str, str], tmp: Path, concurrency: int
) -> tuple[int, tuple[float, float, float, float]]:
    web = WebService(dict(env, WEB_CONCURRENCY=str(concurrency), SEARCH_WARMUP="1"), tmp)
    try:
        wait_until(
            lambda: requests.get(web.url("/readyz"), timeout=10).status_code == 200,
            timeout=600,
            what="every web worker to load the encoder and its replica",
        )
        session = requests.Session()
        # Connections are spread over the workers; enough searches reach every one.
        for _ in range(8 * concurrency):
            requests.get(web.url("/search"), params={"q": "a kitten asleep"}, timeout=120).raise_for_status()
        session.close()
        processes = tree(web.process.pid)
        return len(processes), footprint(processes)
    finally:
        web.stop()


def measure_pool(
    env: dict[str, str], tmp: Path, kind: str, web: WebService
) -> tuple[int, tuple[float, float, float, float]]:
    pool: Process = start_workers(env, tmp, count=1, kind=kind)
    try:
        if kind == "embedder":
            body = {"documents": [{"id": "memory-probe", "text": "a probe document"}]}
            job = web.post_job("embed", body).json()["id"]
        else:
            job = web.post_job("log", {"message": "memory probe"}).json()["id"]
        web.wait_for_status(job, {"finished"}, timeout=600)
        time.sleep(1)  # the work-horse settles after the job
        processes = tree(pool.pid)
        return len(processes), footprint(processes)
    finally:
        pool.kill()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--documents", default="0,100000", help="index sizes, comma-separated")
    parser.add_argument("--concurrency", default="1,2,4", help="WEB_CONCURRENCY values, comma-separated")
    args = parser.parse_args()
    sizes = [int(size) for size in args.documents.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    encoder = get_encoder()
    rows: list[tuple[str, int, str, int, tuple[float, float, float, float]]] = []
    for size in sizes:
        with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            connection = db.client()
            if size:
                fill(DocumentStore(connection), size, encoder.dimensions, encoder.name)
                replica = Replica(connection, encoder.dimensions, directory=tmp / "index")
                replica.load()
                replica.write_snapshot()
                del replica
            env = procfile_env(db.url, tmp, INDEX_DIR=tmp / "index")
            for concurrency in concurrencies:
                count, figures = measure_web(env, tmp, concurrency)
                rows.append(("web", size, f"WEB_CONCURRENCY={concurrency}", count, figures))
                print(
                    f"  web, {size} documents, WEB_CONCURRENCY={concurrency}: {figures[1]:.0f} MB PSS",
                    flush=True,
                )
            web = WebService(dict(env, SEARCH_WARMUP="0"), tmp)
            try:
                for kind in ("worker", "embedder"):
                    count, figures = measure_pool(env, tmp, kind, web)
                    rows.append((kind, size, "1 worker", count, figures))
            finally:
                web.stop()

    print()
    print(
        f"{'process type':12s} {'documents':>9s}  {'setting':18s} {'procs':>5s} "
        f"{'RSS total':>10s} {'PSS total':>10s} {'largest RSS':>12s} {'largest private':>16s}"
    )
    for kind, size, setting, count, (rss, pss, largest, private) in rows:
        print(
            f"{kind:12s} {size:9d}  {setting:18s} {count:5d} {rss:8.0f} MB {pss:8.0f} MB {largest:9.0f} MB"
            f" {private:13.0f} MB"
        )
    webs = {(size, setting): figures for kind, size, setting, _, figures in rows if kind == "web"}
    largest_size = max(sizes)
    one, four = webs.get((largest_size, "WEB_CONCURRENCY=1")), webs.get((largest_size, "WEB_CONCURRENCY=4"))
    if one and four:
        result(
            "web memory, 4 processes vs 1",
            baseline=f"WEB_CONCURRENCY=1: {one[1]:.0f} MB PSS",
            ours=f"WEB_CONCURRENCY=4: {four[1]:.0f} MB PSS",
            ratio=round(four[1] / one[1], 2),
            documents=largest_size,
        )
        result(
            "web memory, one process without shared snapshot pages",
            baseline=f"budget {WEB_BUDGET_MB} MB",
            ours=f"{four[3]:.0f} MB (largest of WEB_CONCURRENCY=4)",
            ratio=round(four[3] / WEB_BUDGET_MB, 2),
            documents=largest_size,
        )


if __name__ == "__main__":
    main()
