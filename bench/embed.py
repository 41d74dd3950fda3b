"""3. Embedding: documents indexed through the service vs what one would write instead.

    .venv/bin/python -m bench.embed [--documents 2000] [--clients 16,1] [--one-client-documents 400]
                                    [--rtt MS[,MS...]]

Baselines, on the same 2 cores:
  - raw: sentence-transformers' `model.encode(texts, batch_size=64)` with torch fp32, the
    best of one process on 2 threads and two processes on 1 thread each (half the texts each);
  - a synchronous endpoint (bench/sync_embed_app.py): a Flask app that encodes each POST's
    text on the spot with the same model and backend (the default EMBED_BACKEND), under
    gunicorn with as many processes as Afterward runs here (4: 2 web processes and 2 embed
    workers; gthread, 4 threads each, keep-alive), on 1 and on 2 model threads per process
    (EMBED_THREADS); the faster is the baseline. No API key, no rate limit, nothing stored.
Afterward, every limit at its default (the rate limit on), until every document is searchable
(its job `finished`, which read-your-writes makes searchable):
  - single-document POSTs from `--clients` clients sharing one API key, each long-polling its
    job (`GET /jobs/<id>?wait=30`) until it ends before the next (a 429 waits its
    Retry-After, as the client library does); 2 web processes (WEB_CONCURRENCY), 2 embed
    workers x 1 thread; with the default backend (target >= 1.0x the synchronous endpoint
    at 16 clients) and with EMBED_BACKEND=torch (target >= 0.7x raw);
  - the documents in bulk POSTs of MAX_DOCUMENTS (256) each, 1 embed worker x 2 threads,
    default backend (target >= 0.9x raw).
Each side runs a few requests per client first, untimed. A run with one client sends
`--one-client-documents`. For the single-document runs, read from the jobs afterwards: how
many jobs an embed worker took per dequeue, where a job's time went (queued; started to
finished: its batch's encode and index write; the rest: the POST, the long poll's answer),
and the CPU each process type spent per document. With `--rtt`, the default backend's
single-document and bulk runs are measured again with every Redis client (the web process,
the embedder, this benchmark's own) behind bench.rtt_proxy, once per round-trip time given
(rows named `..., Redis RTT 1 ms`); the synchronous endpoint and the raw model use no Redis.
"""

from __future__ import annotations

import multiprocessing
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import redis
import requests
from rq.utils import utcparse

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
from bench.costs import Meter, cpu_seconds
from bench.rtt_proxy import RttProxy
from jobs.settings import Settings, get_settings
from scripts.embedded_redis import free_port
from scripts.processes import Process, wait_until
from scripts.stack import procfile_env

WORDS = [
    "river", "market", "engine", "garden", "winter", "signal", "paper", "orbit", "cotton", "harbor",
    "violin", "ladder", "silver", "forest", "planet", "kitchen", "bridge", "thunder", "lantern", "copper",
    "meadow", "circuit", "canvas", "falcon", "desert", "anchor", "velvet", "puzzle", "glacier", "rocket",
]  # fmt: skip


def texts(count: int) -> list[str]:
    rng = random.Random(7)
    return [f"Note {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(12, 24))) + "." for i in range(count)]


def _load(threads: int):
    import torch

    from jobs.index.embedding import model_path

    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_path()), device="cpu")


def _encode(model, texts: list[str]) -> None:
    model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)


def raw(corpus: list[str], threads: int) -> float:
    """One process, `threads` threads."""
    model = _load(threads)
    _encode(model, corpus[:64])  # warm up
    started = time.perf_counter()
    _encode(model, corpus)
    return len(corpus) / (time.perf_counter() - started)


def _raw_share(texts: list[str], ready, done) -> None:
    model = _load(1)
    _encode(model, texts[:64])
    ready.wait()
    _encode(model, texts)
    done.put(time.perf_counter())


def raw_processes(corpus: list[str], processes: int) -> float:
    """`processes` processes on 1 thread each, each encoding its share; the clock runs from
    when all are loaded and warm until the last one is done."""
    context = multiprocessing.get_context("spawn")
    ready, done = context.Barrier(processes + 1), context.Queue()
    shares = [corpus[i::processes] for i in range(processes)]
    workers = [context.Process(target=_raw_share, args=(share, ready, done)) for share in shares]
    for worker in workers:
        worker.start()
    try:
        ready.wait()
        started = time.perf_counter()
        ended = max(done.get(timeout=600) for _ in workers)
        return len(corpus) / (ended - started)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()


def processes(web, kind: str, connection: redis.Redis) -> dict:
    """The process trees whose CPU the run spends: the clients (this process), the web and
    `kind` processes, and Redis when it runs on this machine."""
    pool = next(p for p in psutil.Process().children() if "worker-pool" in " ".join(p.cmdline()))
    found = {"client": psutil.Process, "web": lambda: psutil.Process(web.process.pid), kind: lambda: pool}
    redis_pid = connection.info("server")["process_id"]
    if psutil.pid_exists(redis_pid):
        found["Redis"] = lambda: psutil.Process(redis_pid)
    return found


class Run:
    """One side's figures at one client count."""

    def __init__(self, documents: int, seconds: float, latencies: list[float]) -> None:
        self.rate = documents / seconds
        self.latency = statistics.mean(latencies)
        self.figures: dict[str, float] = {}


def warm_then_time(clients: int, documents: int, call) -> Run:
    """`call` for a few documents per client untimed (warm), then for `documents`, timed."""
    run_clients(clients, 2 * clients, call)
    started = time.perf_counter()
    latencies = run_clients(clients, documents, call)
    return Run(documents, time.perf_counter() - started, latencies)


def synchronous(
    tmp: Path, corpus: list[str], sizes: dict[int, int], threads: int, backend: str
) -> dict[int, Run]:
    """The synchronous endpoint, EMBED_THREADS=`threads`, at each client count (`sizes`: documents)."""
    port = free_port()
    env = procfile_env("redis://127.0.0.1:1/0", tmp, EMBED_BACKEND=backend, EMBED_THREADS=threads)
    command = (
        # --config /dev/null: not the service's gunicorn.conf.py, which this app is none of.
        f"gunicorn --config /dev/null -k gthread -w {SYNC_PROCESSES} --threads {SYNC_THREADS} "
        f"-b 127.0.0.1:{port} 'bench.sync_embed_app:create_app()'"
    )
    process = Process(f"sync-embed-{threads}", command, env, tmp / f"sync-embed-{threads}.log")
    base = f"http://127.0.0.1:{port}"

    def call(session: requests.Session, i: int) -> None:
        response = session.post(base + "/embed", json={"text": corpus[i]}, timeout=60)
        assert response.status_code == 200, response.text

    try:
        # Each process loads its model before it serves: wait until all of them answer.
        wait_until(lambda: _answers(base), timeout=300, what="the synchronous endpoint", process=process)
        runs = {}
        for clients, documents in sizes.items():
            before = cpu_seconds(psutil.Process(process.popen.pid)), cpu_seconds(psutil.Process())
            runs[clients] = run = warm_then_time(clients, documents, call)
            after = cpu_seconds(psutil.Process(process.popen.pid)), cpu_seconds(psutil.Process())
            done = documents + 2 * clients
            run.figures = {
                "CPU ms, client": (after[1] - before[1]) * 1000 / done,
                "CPU ms, gunicorn": (after[0] - before[0]) * 1000 / done,
            }
        return runs
    finally:
        process.kill()


def _answers(base: str) -> bool:
    """Whether every process of the endpoint has loaded its model (a few requests answered)."""
    try:
        with requests.Session() as session:
            return all(
                session.post(base + "/embed", json={"text": "ping"}, timeout=5).status_code == 200
                for _ in range(2 * SYNC_PROCESSES)
            )
    except requests.RequestException:
        return False


@contextmanager
def route(db, rtts: list[float | None]) -> Iterator[tuple[str, Callable[[float | None], None]]]:
    """The Redis URL every process and client of a run uses, and how to set its round-trip
    time: through the RTT proxy (bench.rtt_proxy) when RTTs are given, else Redis itself."""
    if rtts == [None]:
        yield db.url, lambda rtt: None
        return
    with RttProxy(urlsplit(db.url).port) as proxy:
        yield proxy.url(db.url), proxy.set_rtt


def singles(
    db, tmp: Path, corpus: list[str], sizes: dict[int, int], backend: str, rtts: list[float | None]
) -> dict[tuple[float | None, int], Run]:
    """Afterward: single-document POSTs and long polls, one API key for all clients; a run
    for each RTT to Redis (None: no proxy) and client count."""
    keys = ClientKeys(1)
    throttled: list[float] = []
    ids: list[str] = []

    def call(session: requests.Session, method: str, url: str, **kwargs) -> requests.Response:
        while True:
            response = session.request(method, url, headers=keys.headers(session), timeout=60, **kwargs)
            if response.status_code != 429:
                return response
            throttled.append(float(response.headers.get("Retry-After", "1")))
            time.sleep(throttled[-1])

    def submit_and_wait(session: requests.Session, i: int) -> None:
        response = call(session, "POST", web.url("/jobs/embed"), json={"text": corpus[i]})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
        while True:
            view = call(session, "GET", web.url(response.headers["Location"]), params={"wait": 30}).json()
            if view["status"] not in ("queued", "started", "scheduled", "deferred"):
                assert view["status"] == "finished", view
                return

    runs = {}
    with route(db, rtts) as (url, set_rtt):
        env = dict(
            env_for(db, tmp, API_KEYS=keys.setting, EMBED_WORKERS=2, EMBED_THREADS=1, EMBED_BACKEND=backend),
            REDIS_URL=url,
        )
        with service(env, tmp, workers=2, kind="embedder") as web:
            connection = redis.Redis.from_url(url)
            meter = Meter(connection, processes(web, "embedder", connection))
            for rtt in rtts:
                set_rtt(rtt)
                for clients, documents in sizes.items():
                    run_clients(clients, 2 * clients, submit_and_wait)  # warm, untimed
                    ids.clear()
                    throttled.clear()
                    meter.start()
                    started = time.perf_counter()
                    latencies = run_clients(clients, documents, submit_and_wait)
                    runs[rtt, clients] = run = Run(documents, time.perf_counter() - started, latencies)
                    run.figures = meter.stop(documents)
                    run.figures.update(timeline(connection, ids, run.latency))
                    run.figures["429 answers"] = len(throttled)
    return runs


def timeline(connection: redis.Redis, ids: list[str], latency: float) -> dict[str, float]:
    """From the jobs' hashes: jobs per dequeue (a batch's jobs end at the same instant, on one
    worker) and the mean ms a job spent queued and started; the rest of a client's wait."""
    with connection.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(f"rq:job:{job_id}", "enqueued_at", "started_at", "ended_at", "worker_name")
        rows = pipe.execute()
    batches: Counter = Counter()
    queued, running = [], []
    for enqueued, started, ended, worker in rows:
        enqueued, started, ended = (utcparse(value.decode()) for value in (enqueued, started, ended))
        queued.append((started - enqueued).total_seconds())
        running.append((ended - started).total_seconds())
        batches[worker, ended] += 1
    waited = statistics.mean(queued) + statistics.mean(running)
    return {
        "jobs per dequeue": len(ids) / len(batches),
        "most jobs in one dequeue": max(batches.values()),
        "ms queued": statistics.mean(queued) * 1000,
        "ms started to finished": statistics.mean(running) * 1000,
        "ms else (POST, poll)": (latency - waited) * 1000,
    }


def bulk(db, tmp: Path, corpus: list[str], rtts: list[float | None]) -> dict[float | None, float]:
    """Afterward: the corpus in POSTs of MAX_DOCUMENTS, docs/s at each RTT to Redis."""
    per_post = Settings.max_documents
    rates = {}
    with route(db, rtts) as (url, set_rtt):
        env = dict(env_for(db, tmp, EMBED_WORKERS=1, EMBED_THREADS=2), REDIS_URL=url)
        with service(env, tmp, workers=1, kind="embedder") as web:
            for rtt in rtts:
                set_rtt(rtt)
                documents = [{"id": f"bulk-{rtt}-{i}", "text": text} for i, text in enumerate(corpus)]
                started = time.perf_counter()
                ids = []
                for start in range(0, len(documents), per_post):
                    response = web.post_job("embed", {"documents": documents[start : start + per_post]})
                    assert response.status_code == 202, response.text
                    ids.append(response.json()["id"])
                wait_finished(redis.Redis.from_url(url), ids)
                rates[rtt] = len(corpus) / (time.perf_counter() - started)
    return rates


def budget_note(ratio: float, target: float, raw_rate: float, figures: dict[str, float]) -> str:
    """Where the CPU a document may cost at the target goes, when the target is not met."""
    if ratio >= target:
        return ""
    allowed = 2 * 1000 / (target * raw_rate)  # CPU ms per document on 2 cores
    embedder = figures.get("CPU ms, embedder", 0.0)
    http = figures.get("CPU ms, web", 0.0) + figures.get("CPU ms, client", 0.0)
    return (
        f"at {target}x a document may cost {allowed:.1f} CPU ms in all (2 cores); the embedder "
        f"spent {embedder:.1f} (its batches averaged {figures['jobs per dequeue']:.1f} jobs), the web "
        f"process and the clients' POST and long poll {http:.1f}"
    )


def model_ms(backend: str, batch: int) -> float:
    """Wall ms one embed worker's encoder (1 thread) takes for `batch` of the corpus's texts."""
    from jobs.index.embedding import Encoder, OnnxEncoder, model_path
    from jobs.index.onnx_export import ensure_onnx

    path, name = model_path(), Settings.embed_model_name
    if backend == "torch":
        encoder = Encoder(path, 1, Settings.embed_batch_size, name)
    else:
        encoder = OnnxEncoder(path, ensure_onnx(path, name), 1, Settings.embed_batch_size, name)
    sample = texts(max(1, batch))
    encoder.encode(sample)
    best = float("inf")
    for _ in range(20):
        started = time.perf_counter()
        encoder.encode(sample)
        best = min(best, time.perf_counter() - started)
    return best * 1000


# The synchronous endpoint: as many processes as the web and embedder processes of the
# single-document runs hold (2 + 2), and enough threads for 16 clients' connections.
SYNC_PROCESSES = 4
SYNC_THREADS = 4


def at(rtt: float | None) -> str:
    """How a row names the RTT it was measured at (nothing: no proxy)."""
    return "" if rtt is None else f", Redis RTT {rtt:g} ms"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--clients", default="16,1", help="client counts, comma-separated")
    parser.add_argument("--one-client-documents", type=int, default=400)
    parser.add_argument(
        "--rtt",
        help="round-trip times to Redis in ms, comma-separated (e.g. 0,1): the default backend's "
        "single-document and bulk runs again, every Redis client behind bench.rtt_proxy at each",
    )
    args = parser.parse_args()
    corpus = texts(args.documents)
    counts = [int(part) for part in args.clients.split(",")]
    sizes = {n: len(corpus) if n > 1 else min(len(corpus), args.one_client_documents) for n in counts}
    most = max(counts)
    proxied: list[float | None] = [float(part) for part in args.rtt.split(",")] if args.rtt else []
    rtts = [None, *proxied]
    default = get_settings().embed_backend
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        sync = {threads: synchronous(Path(tmp), corpus, sizes, threads, default) for threads in (1, 2)}
        ours = {default: singles(db, Path(tmp), corpus, sizes, default, [None])}
        db.flush()
        if proxied:
            ours[default].update(singles(db, Path(tmp), corpus, sizes, default, proxied))
            db.flush()
        ours["torch"] = singles(db, Path(tmp), corpus, {most: sizes[most]}, "torch", [None])
        db.flush()
        bulk_rates = bulk(db, Path(tmp), corpus, [None])
        if proxied:
            db.flush()
            bulk_rates.update(bulk(db, Path(tmp), corpus, proxied))
    # The raw model at its best on 2 cores.
    raw_rates = {"1 process x 2 threads": raw(corpus, 2), "2 processes x 1 thread": raw_processes(corpus, 2)}
    raw_best = max(raw_rates, key=raw_rates.get)
    raw_rate = raw_rates[raw_best]
    batch = round(ours[default][None, most].figures["jobs per dequeue"])
    model = model_ms(default, batch)

    print(f"embedding {args.documents} documents ({sizes.get(1, args.documents)} with 1 client); 2 cores")
    for how, rate in raw_rates.items():
        print(f"  raw torch model.encode(batch_size=64), {how:24s} {rate:7.1f} docs/s")
    print(f"  synchronous endpoint, {default}, {SYNC_PROCESSES} gunicorn processes x {SYNC_THREADS} threads:")
    for threads, runs in sync.items():
        for clients, run in runs.items():
            costs = ", ".join(f"{name} {value:.1f}" for name, value in run.figures.items())
            print(
                f"    {threads} model thread(s), {clients:2d} client(s)  {run.rate:7.1f} docs/s  "
                f"mean latency {run.latency * 1000:6.1f} ms  ({costs})"
            )
    best_sync = {clients: max((1, 2), key=lambda t: sync[t][clients].rate) for clients in counts}
    print("  Afterward, one document per POST + long poll, one API key shared by all clients:")
    for backend, runs in ours.items():
        for (rtt, clients), run in runs.items():
            against = f"{run.rate / raw_rate:.2f}x raw"
            if backend == default:
                baseline = sync[best_sync[clients]][clients]
                against += f", {run.rate / baseline.rate:.2f}x the synchronous endpoint"
            print(
                f"    {backend}{at(rtt)}, {clients} client(s)  {run.rate:7.1f} docs/s  mean latency "
                f"{run.latency * 1000:6.1f} ms  {against}"
            )
    print("  where a single-document run's time and CPU go, per document:")
    for backend, runs in ours.items():
        for (rtt, clients), run in runs.items():
            parts = ", ".join(f"{name} {value:.1f}" for name, value in run.figures.items())
            print(f"    {backend}{at(rtt)}, {clients} client(s): {parts}")
    print(f"  one embed worker's {default} encode of {batch} texts (1 thread): {model:.1f} ms")
    for rtt, rate in bulk_rates.items():
        label = f"POSTs of {Settings.max_documents} documents, {default}{at(rtt)}"
        print(f"  {label:60s} {rate:7.1f} docs/s   {rate / raw_rate:.2f}x raw (target >= 0.9x)")

    raw_baseline = f"raw torch encode(batch_size=64), {raw_best}: {raw_rate:.1f} docs/s"
    for backend, target in (("torch", 0.7), (default, 1.0)):
        for rtt in rtts if backend == default else [None]:
            run = ours[backend][rtt, most]
            result(
                ("embed_single" if backend == "torch" else f"embed_single {backend}") + at(rtt),
                baseline=raw_baseline,
                ours=f"{run.rate:.1f} docs/s, {most} clients, one key, EMBED_BACKEND={backend}",
                ratio=round(run.rate / raw_rate, 2),
                note=budget_note(run.rate / raw_rate, target, raw_rate, run.figures),
            )
    for rtt in rtts:
        for clients in counts:
            run, threads = ours[default][rtt, clients], best_sync[clients]
            baseline = sync[threads][clients]
            name = "embed_single vs synchronous endpoint" + ("" if clients == most else f", {clients} client")
            result(
                name + at(rtt),
                baseline=(
                    f"Flask + gunicorn encoding on the spot, {SYNC_PROCESSES} processes x {threads} model "
                    f"thread(s), {clients} client(s): {baseline.rate:.1f} docs/s"
                ),
                ours=f"{run.rate:.1f} docs/s, POST + long poll, one key, EMBED_BACKEND={default}",
                ratio=round(run.rate / baseline.rate, 2),
                note=sync_note(run, baseline, model, batch) if clients == most and rtt is None else "",
            )
        result(
            "embed_bulk" + at(rtt),
            baseline=raw_baseline,
            ours=f"{bulk_rates[rtt]:.1f} docs/s, EMBED_BACKEND={default}",
            ratio=round(bulk_rates[rtt] / raw_rate, 2),
        )


def sync_note(ours: Run, baseline: Run, model: float, batch: int) -> str:
    """What stands between the single-document runs and the synchronous endpoint."""
    if ours.rate >= baseline.rate:
        return ""
    figures, theirs = ours.figures, baseline.figures
    spent = sum(value for name, value in figures.items() if name.startswith("CPU ms"))
    spent_sync = sum(value for name, value in theirs.items() if name.startswith("CPU ms"))
    return (
        f"a document costs Afterward {spent:.1f} CPU ms (web {figures['CPU ms, web']:.1f}, embedder "
        f"{figures['CPU ms, embedder']:.1f}, clients {figures['CPU ms, client']:.1f}, Redis "
        f"{figures.get('CPU ms, Redis', 0.0):.1f}) against {spent_sync:.1f} for the synchronous "
        f"endpoint; an embed worker took {figures['jobs per dequeue']:.1f} jobs per dequeue (at most "
        f"{figures['most jobs in one dequeue']:.0f}; EMBED_BATCH_JOBS {Settings.embed_batch_jobs}), whose "
        f"encode takes {model:.1f} ms of their {figures['ms started to finished']:.1f} ms started; a job "
        f"waited {figures['ms queued']:.1f} ms queued, and {figures['ms else (POST, poll)']:.1f} ms of "
        f"a client's {ours.latency * 1000:.1f} went to the POST and the poll's answer"
    )


if __name__ == "__main__":
    main()
