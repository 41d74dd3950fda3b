"""The search index at scale: cold start, Redis memory, and where search should live.

    .venv/bin/python -m bench.index [--documents 100000]

1. Writes `--documents` documents (random unit vectors, ~100-character texts) through the
   store's Lua upsert, then measures a replica's cold start by replaying the change stream,
   and again from a snapshot. Reports Redis bytes per document, before and after a snapshot
   took the place of the change stream.
2. Starts the Procfile's web process (1 process) on that index and compares, in the same
   run: search in-process (encode + FAISS), search over HTTP, a job's round trip through
   the queue (what a search answered by a worker would add at least), and the resident
   memory of a web process before and after it loaded the model and the replica.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import requests

import jobs  # noqa: F401 - pins thread counts before numpy work starts
from bench.common import bench_parser, database, ms, percentile, result
from jobs.index.embedding import get_encoder
from jobs.index.replica import Replica
from jobs.index.store import DocumentStore
from scripts.processes import wait_until
from scripts.stack import WebService, procfile_env, start_workers

QUERIES = ["a kitten asleep in the sun", "interest rates and the stock market", "how to bake bread at home"]


def fill(store: DocumentStore, count: int, dims: int, model: str) -> None:
    rng = np.random.default_rng(7)
    batch = 256
    for start in range(0, count, batch):
        n = min(batch, count - start)
        vectors = rng.standard_normal((n, dims)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        docs = [
            {
                "id": f"doc-{start + i}",
                "text": f"Document {start + i}: " + "lorem ipsum dolor sit amet " * 3,
                "metadata": {"group": (start + i) % 10},
            }
            for i in range(n)
        ]
        store.upsert(docs, vectors, revision=1, model=model)


def timed(fn, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def p99(samples: list[float]) -> str:
    """The 99th percentile of millisecond samples, where there are enough of them."""
    value = percentile([sample / 1000 for sample in samples], 0.99)
    return ms(value)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    encoder = get_encoder()
    with database(args.redis) as db:
        connection = db.client()
        memory_before = connection.info("memory")["used_memory"]
        started = time.perf_counter()
        fill(DocumentStore(connection), args.documents, encoder.dimensions, encoder.name)
        fill_seconds = time.perf_counter() - started
        per_doc = (connection.info("memory")["used_memory"] - memory_before) / args.documents

        replica = Replica(connection, encoder.dimensions)
        started = time.perf_counter()
        replica.load()
        replay_seconds = time.perf_counter() - started
        started = time.perf_counter()
        replica.write_snapshot()
        snapshot_write = time.perf_counter() - started
        # The snapshot holds what the stream held, which it trims: what Redis keeps from now on.
        per_doc_snapshot = (connection.info("memory")["used_memory"] - memory_before) / args.documents
        fresh = Replica(connection, encoder.dimensions)
        started = time.perf_counter()
        fresh.load()
        snapshot_seconds = time.perf_counter() - started
        assert len(fresh) == len(replica) == args.documents

        def in_process() -> None:
            fresh.sync()
            fresh.search(encoder.encode([QUERIES[0]])[0], 10)

        local = timed(in_process, args.repeat)

        with tempfile.TemporaryDirectory() as tmp:
            env = procfile_env(db.url, Path(tmp), WEB_CONCURRENCY=1, SEARCH_WARMUP=0)
            web = WebService(env, Path(tmp))
            workers = start_workers(env, Path(tmp), count=1)
            try:
                web_pid = psutil.Process(web.process.pid).children()[0].pid
                rss_cold = psutil.Process(web_pid).memory_info().rss
                session = requests.Session()
                session.get(web.url("/search"), params={"q": "warm up"}, timeout=120).raise_for_status()
                rss_warm = psutil.Process(web_pid).memory_info().rss
                over_http = timed(
                    lambda: session.get(
                        web.url("/search"), params={"q": QUERIES[0]}, timeout=60
                    ).raise_for_status(),
                    args.repeat,
                )
                wait_until(lambda: connection.scard("rq:workers"), timeout=60, what="a worker")

                def round_trip() -> None:
                    job = session.post(web.url("/jobs/log"), json={"message": "x"}, timeout=30).json()
                    assert (
                        session.get(web.url(f"/jobs/{job['id']}?wait=10"), timeout=30).json()["status"]
                        == "finished"
                    )

                queue = timed(round_trip, args.repeat)
            finally:
                workers.kill()
                web.stop()

    ratio = p50(over_http) / p50(local)
    rows = [
        ("Redis memory per document", f"{per_doc:8.0f} bytes (text, metadata, change entry with the vector)"),
        ("  once a snapshot holds them", f"{per_doc_snapshot:8.0f} bytes (text, metadata, snapshot)"),
        ("cold start, replaying the stream", f"{replay_seconds:8.2f} s"),
        ("cold start, from a snapshot", f"{snapshot_seconds:8.2f} s   (writing it: {snapshot_write:.2f} s)"),
        ("search in-process p50 / p99", f"{p50(local):8.1f} ms / {p99(local)}  (encode + FAISS)"),
        (
            "search over HTTP p50 / p99",
            f"{p50(over_http):8.1f} ms / {p99(over_http)}  ({ratio:.2f}x in-process)",
        ),
        ("a job's round trip via the queue", f"{p50(queue):8.1f} ms  (the least a worker-side search adds)"),
        (
            "web process memory",
            f"{rss_cold / 2**20:8.0f} MB cold, {rss_warm / 2**20:.0f} MB with model and replica",
        ),
    ]
    print(f"{args.documents} documents, {encoder.dimensions} dimensions (filled in {fill_seconds:.1f} s)")
    for label, value in rows:
        print(f"  {label:34s} {value}")
    result(
        "index search",
        baseline=f"in-process p50 {p50(local):.1f} ms",
        ours=f"over HTTP p50 {p50(over_http):.1f} ms",
        ratio=round(ratio, 2),
        documents=args.documents,
    )


if __name__ == "__main__":
    main()
