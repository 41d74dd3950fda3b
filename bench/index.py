"""The search index at scale: Redis bytes, cold start, recall, latency and memory.

    .venv/bin/python -m bench.index [--documents 100000] [--keys 100]

1. Writes `--documents` documents through the store's Lua upsert: synthetic unit vectors
   clustered the way sentence embeddings are (5,000 topics of 20 subtopics; a query's nearest
   document has a median cosine of about 0.7), ~100-character texts. Measures a replica's
   cold start replaying the change stream, then the snapshot it writes (exact up to
   INDEX_EXACT_UP_TO documents, an HNSW graph above) and Redis bytes per document before and
   after the snapshot took the stream's place.
2. Cold start from the snapshot, on a host without its files (copied from Redis) and on one
   that has them (mapped). Recall@10 of that replica against exact search over the same
   vectors, on a fixed set of 200 queries.
3. Starts the Procfile's web process (1 process) on that index and compares, in the same
   run: search in-process (encode + FAISS), search over HTTP, a job's round trip through
   the queue (what a search answered by a worker would add at least), and the resident
   memory of the web process once warm, with and without the snapshot's mapped files.

With `--keys N`, the documents belong to N API keys in turn (INDEX_SCOPE=key, the default:
a namespace each), and every search, recall included, is one key's, through the API with that
key: the true top 10 is the exact search of that key's namespace.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import requests

import jobs  # noqa: F401 - pins thread counts before numpy work starts
from bench.common import bench_parser, database, ms, percentile, result
from jobs import keys
from jobs.index.embedding import get_encoder
from jobs.index.owners import PUBLIC
from jobs.index.replica import Replica
from jobs.index.store import DocumentStore
from jobs.settings import get_settings
from scripts.processes import wait_until
from scripts.stack import WebService, procfile_env, start_workers
from service.security import key_owner

QUERIES = ["a kitten asleep in the sun", "interest rates and the stock market", "how to bake bread at home"]
RECALL_QUERIES = 200
# What one search over HTTP may take at a million documents (p50).
HNSW_BUDGET_MS = 20
MB = 2**20


class Synthetic:
    """Unit vectors clustered like sentence embeddings: topics, subtopics, noise of varied size."""

    def __init__(self, dims: int, topics: int = 5000, subtopics: int = 20, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((topics, 1, dims)).astype(np.float32)
        self.subtopics = centres + 0.5 * rng.standard_normal((topics, subtopics, dims)).astype(np.float32)
        self.dims = dims

    def vectors(self, rng: np.random.Generator, count: int) -> np.ndarray:
        topics, subtopics, _ = self.subtopics.shape
        picks = self.subtopics[rng.integers(0, topics, count), rng.integers(0, subtopics, count)]
        scale = rng.lognormal(np.log(0.8), 0.25, (count, 1)).astype(np.float32)
        vectors = picks + scale * rng.standard_normal((count, self.dims)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def fill(
    store: DocumentStore, count: int, dims: int, model: str, owners: tuple[str, ...] = (PUBLIC,)
) -> Synthetic:
    """`count` documents, the i-th `owners[i % len(owners)]`'s."""
    synthetic, rng = Synthetic(dims), np.random.default_rng(11)
    batch = 256
    for start in range(0, count, batch):
        n = min(batch, count - start)
        docs = [
            {
                "id": f"doc-{start + i}",
                "text": f"Document {start + i}: " + "lorem ipsum dolor sit amet " * 3,
                "metadata": {"group": (start + i) % 10},
            }
            for i in range(n)
        ]
        writers = [owners[(start + i) % len(owners)] for i in range(n)]
        store.upsert(docs, synthetic.vectors(rng, n), revision=1, model=model, owner=writers)
    return synthetic


def snapshot_rss(pid: int) -> float:
    """Resident MB of a process's mapped snapshot files (shared by the host's processes)."""
    maps = psutil.Process(pid).memory_maps()
    return sum(m.rss for m in maps if m.path.endswith((".faiss", ".sqlite"))) / MB


def top_ids(replica: Replica, queries: np.ndarray, namespace: str | None, k: int = 10) -> list[set[str]]:
    return [{doc_id for doc_id, _ in replica.search(query, k, namespace=namespace)} for query in queries]


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
    parser.add_argument(
        "--exact-up-to", type=int, help="INDEX_EXACT_UP_TO for this run (default: the setting's default)"
    )
    parser.add_argument(
        "--keys", type=int, default=0, help="spread the documents over this many API keys; search one's"
    )
    args = parser.parse_args()
    if args.exact_up_to is not None:
        os.environ["INDEX_EXACT_UP_TO"] = str(args.exact_up_to)  # this process and the web process
        get_settings.cache_clear()
    exact_up_to = get_settings().index_exact_up_to
    encoder = get_encoder()
    # With --keys: the API keys, their owners, and the one whose namespace is searched.
    api_keys = [f"bench-key-{i}" for i in range(args.keys)]
    owners = tuple(key_owner(key) for key in api_keys) or (PUBLIC,)
    searched = owners[0] if args.keys else None
    headers = {"Authorization": f"Bearer {api_keys[0]}"} if args.keys else {}
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        connection = db.client()
        memory_before = connection.info("memory")["used_memory"]
        started = time.perf_counter()
        synthetic = fill(DocumentStore(connection), args.documents, encoder.dimensions, encoder.name, owners)
        fill_seconds = time.perf_counter() - started
        per_doc = (connection.info("memory")["used_memory"] - memory_before) / args.documents
        queries = synthetic.vectors(np.random.default_rng(99), RECALL_QUERIES)

        host = tmp / "index"
        replica = Replica(connection, encoder.dimensions, directory=host)
        started = time.perf_counter()
        replica.load()
        replay_seconds = time.perf_counter() - started
        # Everything is in the replica's exact tail now: the true top 10 of each query.
        exact = top_ids(replica, queries, searched)
        started = time.perf_counter()
        replica.write_snapshot()
        snapshot_write = time.perf_counter() - started
        kind = connection.hget(keys.INDEX_SNAPSHOT, "kind").decode()
        del replica
        # The snapshot holds what the stream held, which it trims: what Redis keeps from now on.
        per_doc_snapshot = (connection.info("memory")["used_memory"] - memory_before) / args.documents
        new_host = Replica(connection, encoder.dimensions, directory=tmp / "another-host")
        started = time.perf_counter()
        new_host.load()
        copied_seconds = time.perf_counter() - started
        del new_host
        fresh = Replica(connection, encoder.dimensions, directory=host)
        started = time.perf_counter()
        fresh.load()
        mapped_seconds = time.perf_counter() - started
        assert len(fresh) == args.documents
        found = top_ids(fresh, queries, searched)
        recall = sum(len(a & b) for a, b in zip(exact, found, strict=True)) / (10 * len(queries))

        def in_process() -> None:
            fresh.sync()
            fresh.search(encoder.encode([QUERIES[0]])[0], 10, namespace=searched)

        local = timed(in_process, args.repeat)

        # As deployed (SEARCH_WARMUP=1): the model loaded before the fork, the replica before the
        # process takes requests.
        env = procfile_env(db.url, tmp, WEB_CONCURRENCY=1, INDEX_DIR=host)
        if args.keys:
            env["API_KEYS"] = ",".join(api_keys)
        web = WebService(env, tmp)
        workers = start_workers(env, tmp, count=1)
        try:
            web_pid = psutil.Process(web.process.pid).children()[0].pid
            session = requests.Session()
            session.headers.update(headers)
            session.get(web.url("/search"), params={"q": "warm up"}, timeout=600).raise_for_status()
            over_http = timed(
                lambda: session.get(
                    web.url("/search"), params={"q": QUERIES[0]}, timeout=60
                ).raise_for_status(),
                args.repeat,
            )
            rss_warm = psutil.Process(web_pid).memory_info().rss / MB
            rss_files = snapshot_rss(web_pid)
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
        ("writing the snapshot", f"{snapshot_write:8.2f} s   ({kind})"),
        ("cold start from it, a new host", f"{copied_seconds:8.2f} s   (files copied from Redis)"),
        ("cold start from it, on its host", f"{mapped_seconds:8.2f} s   (files mapped)"),
        ("recall@10 against exact search", f"{recall:8.3f}   ({RECALL_QUERIES} queries)"),
        ("search in-process p50 / p99", f"{p50(local):8.1f} ms / {p99(local)}  (encode + FAISS)"),
        (
            "search over HTTP p50 / p99",
            f"{p50(over_http):8.1f} ms / {p99(over_http)}  ({ratio:.2f}x in-process)",
        ),
        ("a job's round trip via the queue", f"{p50(queue):8.1f} ms  (the least a worker-side search adds)"),
        (
            "web process memory (RSS)",
            f"{rss_warm:8.0f} MB warm, {rss_warm - rss_files:.0f} MB without the"
            f" snapshot's shared files ({rss_files:.0f} MB)",
        ),
    ]
    spread = f", {args.keys} keys (searches: one key's {args.documents // args.keys:,})" if args.keys else ""
    print(
        f"{args.documents} documents, {encoder.dimensions} dimensions (filled in {fill_seconds:.1f} s),"
        f" {kind} snapshot{spread}"
    )
    for label, value in rows:
        print(f"  {label:34s} {value}")
    if args.keys:
        # One key's namespace of a large index: held to the budget of a search of the whole.
        one_key = f"one key of {args.keys}, {args.documents:,} documents"
        result(
            "index search, one key's documents",
            baseline=f"budget: over HTTP p50 {HNSW_BUDGET_MS} ms",
            ours=f"over HTTP p50 {p50(over_http):.1f} ms (in-process {p50(local):.1f} ms), {one_key}",
            ratio=round(p50(over_http) / HNSW_BUDGET_MS, 2),
            documents=args.documents,
            keys=args.keys,
        )
        result(
            "index recall@10, one key's documents",
            baseline="exact search of the key's documents: 1.000",
            ours=f"{kind} snapshot, {one_key}: {recall:.3f}",
            ratio=round(recall, 3),
            documents=args.documents,
            keys=args.keys,
        )
        return
    if args.documents <= exact_up_to:
        # Exact search: serving it over HTTP must cost little on top of the search itself.
        result(
            "index search",
            baseline=f"in-process p50 {p50(local):.1f} ms",
            ours=f"over HTTP p50 {p50(over_http):.1f} ms",
            ratio=round(ratio, 2),
            documents=args.documents,
        )
    else:
        # HNSW: a search takes a few milliseconds, held to a budget rather than to in-process.
        result(
            "index search, HNSW",
            baseline=f"budget: over HTTP p50 {HNSW_BUDGET_MS} ms",
            ours=f"over HTTP p50 {p50(over_http):.1f} ms (in-process {p50(local):.1f} ms),"
            f" {args.documents:,} documents",
            ratio=round(p50(over_http) / HNSW_BUDGET_MS, 2),
            documents=args.documents,
        )
    result(
        "index recall@10",
        baseline="exact search: 1.000",
        ours=f"{kind} snapshot, {args.documents:,} documents: {recall:.3f}",
        ratio=round(recall, 3),
        documents=args.documents,
    )


if __name__ == "__main__":
    main()
