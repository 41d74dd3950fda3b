"""5. An idle service's latencies and footprint.

    .venv/bin/python -m bench.latency [--samples 50]

POST -> `finished` for a log job (long-polling the status URL), POST -> searchable for one
document (its embed job `finished`, then a search that finds it), the first search a web
process answers once it takes requests (SEARCH_WARMUP=1, the default), and the resident
memory of each process type once warm. Cold start and Redis bytes per document at 100k documents
are in `bench.index`.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import psutil
import requests

from bench.common import bench_parser, database, env_for, median, ms, percentile, result
from scripts.processes import wait_until
from scripts.stack import WebService, start_workers


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = dict(env_for(db, tmp_path), SEARCH_WARMUP="1", WEB_CONCURRENCY="1")
        web = WebService(env, tmp_path)
        workers = start_workers(env, tmp_path, count=1)
        embedder = start_workers(env, tmp_path, count=1, kind="embedder")
        connection = db.client()
        session = requests.Session()
        try:
            wait_until(lambda: connection.scard("rq:workers") >= 2, timeout=180, what="workers")
            started = time.perf_counter()  # the web process answers: it is ready
            session.get(
                web.url("/search"), params={"q": "the very first search"}, timeout=120
            ).raise_for_status()
            first_search = time.perf_counter() - started
            for _ in range(5):  # warm up both paths
                session.get(web.url("/search"), params={"q": "warm up"}, timeout=120)
                session.post(web.url("/jobs/log"), json={"message": "warm"}, timeout=30)
            log_latency = []
            for i in range(args.samples):
                started = time.perf_counter()
                job = session.post(web.url("/jobs/log"), json={"message": f"latency {i}"}, timeout=30).json()
                view = session.get(web.url(f"/jobs/{job['id']}"), params={"wait": 30}, timeout=60).json()
                assert view["status"] == "finished", view
                log_latency.append((time.perf_counter() - started) * 1000)
            search_latency = []
            for i in range(max(5, args.samples // 5)):
                marker = uuid.uuid4().hex
                started = time.perf_counter()
                job = session.post(
                    web.url("/jobs/embed"),
                    json={"text": f"lighthouse {i}", "metadata": {"m": marker}},
                    timeout=30,
                ).json()
                session.get(web.url(f"/jobs/{job['id']}"), params={"wait": 60}, timeout=90)
                found = session.post(
                    web.url("/search"),
                    json={"query": "lighthouse", "k": 1, "filter": {"m": marker}},
                    timeout=60,
                ).json()["results"]
                assert found, "not searchable after finished"
                search_latency.append((time.perf_counter() - started) * 1000)
            gunicorn_workers = psutil.Process(web.process.pid).children()
            footprint = {
                "web (gunicorn worker, model + replica loaded)": max(rss_mb(p.pid) for p in gunicorn_workers),
                "worker (rq worker-pool, one worker)": sum(
                    rss_mb(p.pid) for p in psutil.Process(workers.pid).children()
                ),
                "embedder (one worker, model loaded)": max(
                    rss_mb(p.pid) for p in psutil.Process(embedder.pid).children()
                ),
            }
        finally:
            embedder.kill()
            workers.kill()
            web.process.kill()
    print(f"idle service, {args.samples} samples")
    for label, samples in (
        ("log job, POST -> finished", log_latency),
        ("one document, POST -> searchable", search_latency),
    ):
        seconds = [sample / 1000 for sample in samples]
        print(f"  {label:33s} p50 {ms(median(seconds))}   p95 {ms(percentile(seconds, 0.95))}")
        result(f"latency {label}", ours=f"p50 {ms(median(seconds))}", samples=len(samples))
    print(f"  first search after the web process is ready   {ms(first_search)}")
    result("latency first search after ready", ours=ms(first_search))
    for label, mb in footprint.items():
        print(f"  resident memory, {label:46s} {mb:6.0f} MB")


if __name__ == "__main__":
    main()
