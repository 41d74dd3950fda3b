"""3. Embedding throughput: documents indexed through the service vs raw batched `model.encode`.

    .venv/bin/python -m bench.embed [--documents 2000] [--clients 16]

Raw: `model.encode(all_texts, batch_size=64)` in this process, torch on 1 and on 2 threads;
the faster is the baseline (each service run below uses 2 threads in all). Then, until every
document is searchable (its job `finished`, which read-your-writes makes searchable), every
limit at its default:
  - single-document POSTs from `--clients` clients, each with an API key of its own, each
    long-polling its job until it ends before the next; 2 embed workers x 1 thread;
  - the documents in bulk POSTs of MAX_DOCUMENTS (256) each, 1 embed worker x 2 threads.
Targets: >= 0.7x raw for single documents, >= 0.85x raw in bulk.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import requests

from bench.common import (
    ClientKeys,
    bench_parser,
    database,
    env_for,
    result,
    run_clients,
    service,
    wait_finished,
)
from jobs.settings import Settings, get_settings

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
    keys = ClientKeys(clients)
    env = env_for(db, tmp, API_KEYS=keys.setting, EMBED_WORKERS=2, EMBED_THREADS=1)

    def submit_and_wait(session: requests.Session, i: int) -> None:
        headers = keys.headers(session)
        response = session.post(web.url("/jobs/embed"), json={"text": corpus[i]}, headers=headers, timeout=60)
        assert response.status_code == 202, response.text
        while True:
            view = session.get(
                web.url(response.headers["Location"]), params={"wait": 30}, headers=headers, timeout=60
            ).json()
            if view["status"] not in ("queued", "started", "scheduled", "deferred"):
                assert view["status"] == "finished", view
                return

    with service(env, tmp, workers=2, kind="embedder") as web:
        started = time.perf_counter()
        run_clients(clients, len(corpus), submit_and_wait)
        return len(corpus) / (time.perf_counter() - started)


def bulk(db, tmp: Path, corpus: list[str]) -> float:
    env = env_for(db, tmp, EMBED_WORKERS=1, EMBED_THREADS=2)
    per_post = Settings.max_documents
    with service(env, tmp, workers=1, kind="embedder") as web:
        documents = [{"id": f"bulk-{i}", "text": text} for i, text in enumerate(corpus)]
        started = time.perf_counter()
        ids = []
        for start in range(0, len(documents), per_post):
            response = web.post_job("embed", {"documents": documents[start : start + per_post]})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        wait_finished(db.client(), ids)
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
    # The raw model at its best thread count on this machine.
    raw_rates = {threads: raw(corpus, threads) for threads in (1, 2)}
    raw_threads = max(raw_rates, key=raw_rates.get)
    raw_rate = raw_rates[raw_threads]
    print(
        f"embedding {args.documents} documents (2 threads in all for each service run; "
        f"the service's EMBED_BACKEND: {get_settings().embed_backend}, the raw baseline: torch)"
    )
    for threads, rate in raw_rates.items():
        print(f"  raw model.encode(batch_size=64), {threads} thread(s)  {rate:7.1f} docs/s")
    print(
        f"  {args.clients} clients, one document per POST       {single_rate:7.1f} docs/s   "
        f"{single_rate / raw_rate:.2f}x raw (target >= 0.7x)"
    )
    print(
        f"  POSTs of {Settings.max_documents} documents                  {bulk_rate:7.1f} docs/s   "
        f"{bulk_rate / raw_rate:.2f}x raw (target >= 0.85x)"
    )
    baseline = f"raw encode(batch_size=64), 2 threads: {raw_rate:.1f} docs/s"
    result(
        "embed_single",
        baseline=baseline,
        ours=f"{single_rate:.1f} docs/s",
        ratio=round(single_rate / raw_rate, 2),
    )
    result(
        "embed_bulk", baseline=baseline, ours=f"{bulk_rate:.1f} docs/s", ratio=round(bulk_rate / raw_rate, 2)
    )


if __name__ == "__main__":
    main()
