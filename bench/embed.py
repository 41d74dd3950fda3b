"""3. Embedding throughput: documents indexed through the service vs raw batched `model.encode`.

    .venv/bin/python -m bench.embed [--documents 2000] [--clients 16]

Raw: `model.encode(all_texts, batch_size=64)` in this process, torch on 2 threads — the
same total threads as each service run below. Then, until every document is searchable
(its job `finished`, which read-your-writes makes searchable):
  - many single-document POSTs from `--clients` clients, 2 embed workers x 1 thread;
  - one bulk POST of all documents, 1 embed worker x 2 threads.
Targets: >= 0.7x raw for single documents, >= 0.85x raw for the bulk POST.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from bench.common import bench_parser, database, env_for, run_clients, service, wait_finished

WORDS = [
    "river", "market", "engine", "garden", "winter", "signal", "paper", "orbit", "cotton", "harbor",
    "violin", "ladder", "silver", "forest", "planet", "kitchen", "bridge", "thunder", "lantern", "copper",
    "meadow", "circuit", "canvas", "falcon", "desert", "anchor", "velvet", "puzzle", "glacier", "rocket",
]  # fmt: skip


def texts(count: int) -> list[str]:
    rng = random.Random(7)
    return [f"Note {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(12, 24))) + "." for i in range(count)]


def raw(corpus: list[str], threads: int) -> float:
    import torch

    from jobs.index.embedding import model_path

    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path()), device="cpu")
    model.encode(corpus[:64], batch_size=64)  # warm up
    started = time.perf_counter()
    model.encode(corpus, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    return len(corpus) / (time.perf_counter() - started)


def singles(db, tmp: Path, corpus: list[str], clients: int) -> float:
    env = env_for(db, tmp, RATE_LIMIT="off", EMBED_WORKERS=2, EMBED_THREADS=1)
    with service(env, tmp, workers=2, kind="embedder") as web:
        ids: list[str] = []
        started = time.perf_counter()
        run_clients(
            clients,
            len(corpus),
            lambda s, i: ids.append(
                s.post(web.url("/jobs/embed"), json={"text": corpus[i]}, timeout=60).json()["id"]
            ),
        )
        wait_finished(db.client(), ids)
        return len(corpus) / (time.perf_counter() - started)


def bulk(db, tmp: Path, corpus: list[str]) -> float:
    env = env_for(
        db,
        tmp,
        RATE_LIMIT="off",
        EMBED_WORKERS=1,
        EMBED_THREADS=2,
        MAX_DOCUMENTS=len(corpus),
        MAX_BODY_BYTES=1 << 24,
    )
    with service(env, tmp, workers=1, kind="embedder") as web:
        documents = [{"id": f"bulk-{i}", "text": text} for i, text in enumerate(corpus)]
        started = time.perf_counter()
        job = web.post_job("embed", {"documents": documents}).json()
        wait_finished(db.client(), [job["id"]])
        return len(corpus) / (time.perf_counter() - started)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    corpus = texts(args.documents)
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        single_rate = singles(db, Path(tmp), corpus, args.clients)
        db.flush()
        bulk_rate = bulk(db, Path(tmp), corpus)
    raw_rate = raw(corpus, threads=2)
    print(f"embedding {args.documents} documents (2 threads in every case)")
    print(f"  raw model.encode(batch_size=64)              {raw_rate:7.1f} docs/s")
    print(
        f"  {args.clients} clients, one document per POST       {single_rate:7.1f} docs/s   "
        f"{single_rate / raw_rate:.2f}x raw (target >= 0.7x)"
    )
    print(
        f"  one POST of {args.documents} documents               {bulk_rate:7.1f} docs/s   "
        f"{bulk_rate / raw_rate:.2f}x raw (target >= 0.85x)"
    )


if __name__ == "__main__":
    main()
