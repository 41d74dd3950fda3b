"""Embedding backends: torch vs ONNX Runtime (fp32), speed and agreement.

    .venv/bin/python -m bench.embed_backends [--documents 2000] [--queries 50] [--repeat 3]

Each backend encodes the synthetic corpus of bench.embed (`--documents` notes) through the
encoder the service uses (EMBED_BATCH_SIZE 64), on 1 and on 2 threads (EMBED_THREADS); each
figure is the best of `--repeat` runs, the runs of all backends taking turns. The baseline
is torch fp32 at its faster thread count. Agreement: `--queries` short queries made of the
corpus's words, each searched by exact inner product over the corpus encoded by the same
backend; the mean share of torch's top 10 document ids that the backend's top 10 holds
(1.0: every search returns what torch's returns). No Redis is used (`--redis` is ignored).
The ONNX file is exported into EMBED_MODEL_CACHE first if missing, outside the timing.
(onnx-int8, ONNX Runtime's dynamic int8 quantization of that graph, was withdrawn: its top-10
agreement was 0.83.)
"""

from __future__ import annotations

import random
import time

import numpy as np

from bench.common import bench_parser, result
from bench.embed import WORDS, texts
from jobs.index.embedding import Encoder, OnnxEncoder, TextEncoder, model_path
from jobs.index.onnx_export import ensure_onnx
from jobs.settings import BACKENDS, Settings

THREADS = (1, 2)
BATCH_SIZE = Settings.embed_batch_size
K = 10
# A backend may be the default only if its searches agree with torch's at least this much.
AGREEMENT = 0.99


def queries(count: int) -> list[str]:
    rng = random.Random(11)
    return [" ".join(rng.sample(WORDS, k=rng.randint(3, 6))) for _ in range(count)]


def encoder(backend: str, threads: int) -> TextEncoder:
    path, name = model_path(), Settings.embed_model_name
    if backend == "torch":
        return Encoder(path, threads, BATCH_SIZE, name)
    return OnnxEncoder(path, ensure_onnx(path, name), threads, BATCH_SIZE, name)


def rate(model: TextEncoder, backend: str, threads: int, corpus: list[str]) -> float:
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)  # one process-wide setting: the torch runs take turns
    started = time.perf_counter()
    model.encode(corpus)
    return len(corpus) / (time.perf_counter() - started)


def top_ids(query_vectors: np.ndarray, corpus_vectors: np.ndarray) -> list[set[int]]:
    scores = query_vectors @ corpus_vectors.T
    return [set(np.argsort(-row, kind="stable")[:K].tolist()) for row in scores]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    corpus, asked = texts(args.documents), queries(args.queries)

    encoders = {(backend, threads): encoder(backend, threads) for backend in BACKENDS for threads in THREADS}
    for model in encoders.values():
        model.encode(corpus[:BATCH_SIZE])  # warm up
    rates: dict[tuple[str, int], float] = dict.fromkeys(encoders, 0.0)
    for _ in range(args.repeat):
        for (backend, threads), model in encoders.items():
            rates[backend, threads] = max(rates[backend, threads], rate(model, backend, threads, corpus))

    expected = None
    agreement: dict[str, float] = {}
    similarity: dict[str, float] = {}
    vectors: dict[str, np.ndarray] = {}
    for backend in BACKENDS:
        model = encoders[backend, 1]
        vectors[backend] = model.encode(corpus)
        found = top_ids(model.encode(asked), vectors[backend])
        expected = expected or found
        agreement[backend] = float(np.mean([len(a & b) / K for a, b in zip(found, expected, strict=True)]))
        similarity[backend] = float(np.mean((vectors[backend] * vectors["torch"]).sum(axis=1)))

    best = {backend: max(THREADS, key=lambda threads: rates[backend, threads]) for backend in BACKENDS}
    baseline_rate = rates["torch", best["torch"]]
    print(
        f"encoding {args.documents} texts (batches of {BATCH_SIZE}), best of {args.repeat} runs; "
        f"top-{K} agreement with torch over {args.queries} queries"
    )
    print(f"  {'backend':<10} {'threads':>7} {'docs/s':>8} {'vs torch':>9} {'agreement':>10} {'cosine':>8}")
    for (backend, threads), value in rates.items():
        print(
            f"  {backend:<10} {threads:>7} {value:8.1f} {value / baseline_rate:8.2f}x "
            f"{agreement[backend]:10.3f} {similarity[backend]:8.4f}"
        )
    eligible = [backend for backend in BACKENDS if agreement[backend] >= AGREEMENT]
    fastest = max(eligible, key=lambda backend: rates[backend, best[backend]])
    print(f"fastest backend whose agreement is >= {AGREEMENT}: {fastest}")

    baseline = f"torch fp32, {best['torch']} thread(s): {baseline_rate:.1f} docs/s"
    for backend in BACKENDS[1:]:
        ours = rates[backend, best[backend]]
        result(
            f"embed_backend {backend}",
            baseline=baseline,
            ours=f"{ours:.1f} docs/s ({best[backend]} thread(s)), top-{K} agreement {agreement[backend]:.3f}",
            ratio=round(ours / baseline_rate, 2),
        )


if __name__ == "__main__":
    main()
