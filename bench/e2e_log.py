"""1. End to end: each client submits a log job and waits for it to finish, again and again,
at each round-trip time to Redis.

    .venv/bin/python -m bench.e2e_log [--jobs 1000] [--clients 16] [--workers 2] [--rtt 0,0.5,1,2]

Every Redis client of the run, web processes, workers and benchmark clients alike, connects
through bench.rtt_proxy, which holds each chunk of bytes half the RTT each way (a deployed
Redis is 0.2 to 2 ms away; loopback 0.03 ms). The systems start once and stay up (each on a
database of its own, same server); at each RTT the proxy is set, then each system is measured
in turn: throughput with `--clients` client threads, POST -> finished p50/p99 (for stock RQ:
enqueue -> finished), then an idle run (one client, one job at a time, `--idle` jobs).

Afterward, used as the README shows: the Procfile's web process (2 gunicorn processes) and
`rq worker-pool` with `--workers` workers, every setting at its default (rate limit
included); each client POSTs a job with its API key and long-polls the job's status URL
(`?wait=30`) until the job ends, then submits the next. Measured twice: with one API key for
all clients (a new one at each RTT; a 429 is waited out as its Retry-After says, and
counted) and with one key per client.

Stock RQ at its best documented setting: `--workers` `rq worker` processes (a worker-pool)
with the job's module imported before they fork (bench.stock_worker: RQ's docs advise
preloading), RQ's default serializer; each client thread calls `queue.enqueue` and waits
with `job.latest_result(timeout=30)`, RQ's own blocking wait. Also RQ's `SimpleWorker`
(no fork per job), the same way.

The HTTP ceiling (at the first RTT only; it has no Redis): the same client loop against a
bare Flask app under the same gunicorn settings that answers the POST and the GET with no
queue at all (bench.ceiling_app).

Critical-path round trips: how many sequential round trips an idle job waits for,
(idle p50 at RTT r - idle p50 at 0 ms) / r.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import redis
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
    run_clients,
    service,
)
from bench.common import result as common_result
from bench.rtt_proxy import RttProxy
from scripts.embedded_redis import free_port
from scripts.processes import ROOT, Process, wait_until
from scripts.stack import TestDatabase, serves

TERMINAL = {"finished", "failed", "canceled", "stopped"}
BASELINE = "stock rq.Worker, preloaded"
SIMPLE = "rq.SimpleWorker"
STOCK = {BASELINE: "rq.Worker", SIMPLE: "rq.SimpleWorker"}
SHARED = "Afterward, one API key"
OWN = "Afterward, a key per client"
OURS = OWN  # the row `e2e_log` has always measured
CEILING = "HTTP ceiling: bare Flask, no queue"
# The targets at 1 ms RTT: end to end against stock, and against Afterward's own 0 ms figure;
# an idle job's POST -> finished p50 within IDLE_BASE + IDLE_PER_RTT round trips.
IDLE_BASE_MS, IDLE_PER_RTT = 10.0, 8

# Submits one job and waits for its end; the client's session is for HTTP.
Submit = Callable[[requests.Session, int], None]


class Measured:
    """One system at one RTT: throughput, latencies under load and idle, 429s answered."""

    def __init__(self, rate: float, latencies: list[float], idle: list[float], refused: int) -> None:
        self.rate, self.latencies, self.idle, self.refused = rate, latencies, idle, refused


def measure(submit: Submit, jobs: int, clients: int, idle: int, counter: list[int]) -> Measured:
    counter[0] = 0
    started = time.perf_counter()
    latencies = run_clients(clients, jobs, submit)
    rate = jobs / (time.perf_counter() - started)
    refused = counter[0]
    return Measured(rate, latencies, run_clients(1, idle, submit), refused)


@contextmanager
def afterward(
    db: TestDatabase, url: str, tmp: Path, clients: int, workers: int, runs: int
) -> Iterator[tuple[list[Submit], Submit, list[int]]]:
    """Afterward's processes on `url`: submit functions for one key shared by all clients (a
    new key for each of `runs` runs, so that no run inherits another's rate-limit window) and
    for a key per client, and the count of 429s answered."""
    own = ClientKeys(clients)
    shared = [ClientKeys(1) for _ in range(runs)]
    settings = ",".join([*(keys.setting for keys in shared), own.setting])
    env = env_for(db, tmp, API_KEYS=settings, REDIS_URL=url)
    refused = [0]
    lock = threading.Lock()

    def submitter(keys: ClientKeys) -> Submit:
        def submit_and_wait(session: requests.Session, i: int) -> None:
            headers = keys.headers(session)
            while True:
                response = session.post(
                    web.url("/jobs/log"), json={"message": f"job {i}"}, headers=headers, timeout=30
                )
                if response.status_code != 429:
                    break
                with lock:
                    refused[0] += 1
                time.sleep(float(response.headers.get("Retry-After", 1)))
            assert response.status_code == 202, response.text
            location = web.url(response.headers["Location"])
            while True:
                view = session.get(location, params={"wait": 30}, headers=headers, timeout=60)
                if view.status_code == 429:
                    with lock:
                        refused[0] += 1
                    time.sleep(float(view.headers.get("Retry-After", 1)))
                    continue
                status = view.json()["status"]
                if status in TERMINAL:
                    assert status == "finished", view.text
                    return

        return submit_and_wait

    with service(env, tmp, workers=workers) as web:
        yield [submitter(keys) for keys in shared], submitter(own), refused


@contextmanager
def stock(
    db: TestDatabase, url: str, tmp: Path, workers: int, worker_class: str
) -> Iterator[tuple[Submit, list[int]]]:
    env = env_for(db, tmp, REDIS_URL=url)
    command = (
        f"{sys.executable} -m bench.stock_worker worker-pool default "
        f"--num-workers {workers} --worker-class {worker_class}"
    )
    pool = Process("stock", command, env, tmp / f"stock-{worker_class}.log", cwd=ROOT)
    connection = redis.Redis.from_url(url)
    try:
        wait_until(lambda: connection.scard("rq:workers") >= workers, what="stock workers", process=pool)
        queue = Queue("default", connection=connection)

        def submit_and_wait(session: requests.Session, i: int) -> None:
            job = queue.enqueue("jobs.types.log.write_log", message=f"job {i}")
            outcome = job.latest_result(timeout=30)
            assert outcome is not None and outcome.type == outcome.Type.SUCCESSFUL, outcome

        yield submit_and_wait, [0]
    finally:
        pool.kill()
        connection.close()


def ceiling(db: TestDatabase, tmp: Path, jobs: int, clients: int) -> tuple[float, list[float]]:
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


def ping_ms(url: str, samples: int = 200) -> float:
    """The median PING round trip to `url`, in milliseconds."""
    client = redis.Redis.from_url(url)
    client.ping()
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - started)
    client.close()
    return median(times) * 1000


def rtt_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def label_rtt(rtt: float) -> str:
    return f"{rtt:g} ms RTT"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per system and RTT (p99 needs 1,000)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--idle", type=int, default=100, help="jobs of the idle run (one client)")
    parser.add_argument(
        "--rtt", type=rtt_list, default=[0.0, 0.5, 1.0, 2.0], help="round-trip times in ms, e.g. 0,0.5,1,2"
    )
    args = parser.parse_args()
    runs: dict[tuple[float, str], Measured] = {}
    rtts: dict[float, float] = {}
    with database(args.redis) as db, tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        tmp = Path(scratch)
        target = urlsplit(db.base_url)
        proxy = stack.enter_context(
            RttProxy.with_rtt(target.port or 6379, args.rtt[0], target_host=target.hostname or "127.0.0.1")
        )
        direct_ms, zero_ms = ping_ms(db.url), ping_ms(proxy.url(db.url))
        # A database of its own for each system: each stays up through every RTT.
        systems: dict[str, tuple[Submit, list[int]]] = {}
        for label, worker_class in STOCK.items():
            own_db = stack.enter_context(_database_on(db))
            url = proxy.url(own_db.url)
            systems[label] = stack.enter_context(stock(own_db, url, tmp, args.workers, worker_class))
        shared, own, refused = stack.enter_context(
            afterward(db, proxy.url(db.url), tmp, args.clients, args.workers, len(args.rtt))
        )
        systems[OWN] = (own, refused)
        for rtt, shared_key in zip(args.rtt, shared, strict=True):
            systems[SHARED] = (shared_key, refused)
            proxy.set_rtt(rtt)
            rtts[rtt] = ping_ms(proxy.url(db.url))
            for label, (submit, counter) in systems.items():
                runs[rtt, label] = measure(submit, args.jobs, args.clients, args.idle, counter)
                rate = runs[rtt, label].rate
                print(f"  measured {label} at {label_rtt(rtt)}: {rate:.1f} jobs/s", flush=True)
        ceiling_rate, ceiling_latencies = ceiling(db, tmp, args.jobs, args.clients)
    report(args, runs, rtts, direct_ms, zero_ms, ceiling_rate, ceiling_latencies)


@contextmanager
def _database_on(db: TestDatabase) -> Iterator[TestDatabase]:
    other = TestDatabase(db.base_url).acquire()
    try:
        yield other
    finally:
        other.release()


Runs = dict[tuple[float, str], Measured]


def report(
    args: argparse.Namespace,
    runs: Runs,
    rtts: dict[float, float],
    direct_ms: float,
    zero_ms: float,
    ceiling_rate: float,
    ceiling_latencies: list[float],
) -> None:
    print(
        f"end to end: {args.jobs} log jobs per system and RTT, {args.clients} clients each waiting for "
        f"its job, {args.workers} worker processes; idle: one client, {args.idle} jobs one at a time"
    )
    print(
        f"Redis PING p50: direct {direct_ms:.3f} ms, through the proxy at 0 delay {zero_ms:.3f} ms "
        f"(the proxy's own cost); through the proxy at each setting: "
        + ", ".join(f"{label_rtt(rtt)} -> {measured:.3f} ms" for rtt, measured in rtts.items())
    )
    for rtt in args.rtt:
        baseline = runs[rtt, BASELINE].rate
        print(f"\nat {label_rtt(rtt)} (PING p50 {rtts[rtt]:.2f} ms):")
        print(
            f"  {'':30s} {'jobs/s':>8s} {'x stock':>8s} {'p50':>10s} {'p99':>10s} {'idle p50':>10s}"
            f" {'critical-path RTs':>18s} {'429s':>6s}"
        )
        for label in (BASELINE, SIMPLE, SHARED, OWN):
            run = runs[rtt, label]
            idle = median(run.idle)
            trips = ""
            if rtt > 0 and (0.0, label) in runs:
                trips = f"{(idle - median(runs[0.0, label].idle)) * 1000 / rtts_added(rtts, rtt):.1f}"
            print(
                f"  {label:30s} {run.rate:8.1f} {run.rate / baseline:7.2f}x {ms(median(run.latencies)):>10s}"
                f" {ms(percentile(run.latencies, 0.99)):>10s} {ms(idle):>10s} {trips:>18s} {run.refused:6d}"
            )
    print(
        f"\n  {CEILING} (no Redis) {ceiling_rate:.1f} POST + GET pairs/s, p50 {ms(median(ceiling_latencies))}"
    )
    print(
        "\n  p50/p99: POST -> finished seen by the client (stock: enqueue -> latest_result); "
        "critical-path RTs: (idle p50 at this RTT - idle p50 at 0 ms) / the RTT the proxy adds"
    )
    results(args, runs, rtts, ceiling_rate)


def rtts_added(rtts: dict[float, float], rtt: float) -> float:
    """The round trip the proxy adds at `rtt` as measured (PING through it against at 0 ms)."""
    zero = rtts.get(0.0, rtts[rtt])
    return rtts[rtt] - zero if rtts[rtt] > zero else rtt


def results(args: argparse.Namespace, runs: Runs, rtts: dict[float, float], ceiling_rate: float) -> None:
    notes = []

    def result(name: str, **figures: object) -> None:
        """bench.common's, and the note of a target not met printed too (for the section)."""
        if figures.get("note"):
            notes.append(f"  - {name}: {figures['note']}")
        common_result(name, **figures)

    first = args.rtt[0]
    ours, baseline = runs[first, OWN].rate, runs[first, BASELINE].rate
    at = "" if first == 0 else f" at {label_rtt(first)}"
    ceiling_ratio = ceiling_rate / baseline
    result(
        "e2e_log",
        baseline=f"{BASELINE}: {baseline:.1f} jobs/s{at}",
        simple=f"{SIMPLE}: {runs[first, SIMPLE].rate:.1f} jobs/s",
        ceiling=f"{CEILING}: {ceiling_rate:.1f} pairs/s, ours {ours / ceiling_rate:.2f}x it",
        ours=f"{ours:.1f} jobs/s (a key per client)",
        ratio=round(ours / baseline, 2),
        note=(
            f"a bare Flask app answering the same POST and GET pairs with no queue at all reaches "
            f"{ceiling_ratio:.2f}x stock here, so 5x stock is above what any service answering these "
            f"requests can reach on this machine"
            if ceiling_ratio < 5
            else ""
        ),
    )
    result(
        "e2e_log vs HTTP ceiling",
        baseline=f"{CEILING}: {ceiling_rate:.1f} POST + GET pairs/s",
        ours=f"{ours:.1f} jobs/s",
        ratio=round(ours / ceiling_rate, 2),
    )
    if 1.0 in args.rtt:
        stock_1 = runs[1.0, BASELINE].rate
        for label in (SHARED, OWN):
            run = runs[1.0, label]
            limited = (
                f"its {run.refused} answers 429 (the default RATE_LIMIT, per key, counts the POST and "
                f"the GET of every job) stand in the way"
                if run.refused
                else critical_path_note(runs, rtts, label)
            )
            result(
                f"e2e_log at 1 ms RTT, {label.removeprefix('Afterward, ')}",
                baseline=f"{BASELINE}: {stock_1:.1f} jobs/s; {SIMPLE}: {runs[1.0, SIMPLE].rate:.1f}",
                ours=f"{run.rate:.1f} jobs/s, p50 {ms(median(run.latencies))}, "
                f"p99 {ms(percentile(run.latencies, 0.99))}",
                ratio=round(run.rate / stock_1, 2),
                note=limited if run.rate < 3 * stock_1 else "",
            )
    if 0.0 in args.rtt and 1.0 in args.rtt:
        for label in (OWN, SHARED):
            keep = runs[1.0, label].rate / runs[0.0, label].rate
            result(
                f"e2e_log: Afterward at 1 ms RTT vs 0 ms, {label.removeprefix('Afterward, ')}",
                baseline=f"0 ms RTT: {runs[0.0, label].rate:.1f} jobs/s",
                ours=f"1 ms RTT: {runs[1.0, label].rate:.1f} jobs/s",
                ratio=round(keep, 2),
                note=worker_note(args.workers, runs, rtts, label) if keep < 0.8 else "",
            )
    for rtt in (0.0, 1.0):
        if rtt not in args.rtt:
            continue
        bound = IDLE_BASE_MS + IDLE_PER_RTT * rtt
        idle = median(runs[rtt, OWN].idle) * 1000
        result(
            f"e2e_log idle POST -> finished p50 at {label_rtt(rtt)}",
            baseline=f"bound: {IDLE_BASE_MS:g} ms + {IDLE_PER_RTT} RTT = {bound:g} ms; "
            f"stock enqueue -> finished {ms(median(runs[rtt, BASELINE].idle))}",
            ours=f"{idle:.1f} ms",
            ratio=round(idle / bound, 2),
            note=idle_note(runs, rtts, rtt) if idle > bound else "",
        )
    if notes:
        print("\nWhat the measurements show in the way of the targets not met:")
        print("\n".join(notes))


def idle_note(runs: Runs, rtts: dict[float, float], rtt: float) -> str:
    """What an idle job's POST -> finished is made of: round trips on its critical path, and CPU."""
    if (0.0, OWN) not in runs or (1.0, OWN) not in runs:
        return ""
    idle_0, idle_1 = median(runs[0.0, OWN].idle) * 1000, median(runs[1.0, OWN].idle) * 1000
    trips = (idle_1 - idle_0) / rtts_added(rtts, 1.0)
    idle = idle_0 if rtt == 0 else idle_1
    waiting = trips * rtts[rtt]
    return (
        f"{OWN}, one job at a time: {trips:.1f} round trips on the critical path (idle p50 "
        f"{idle_0:.1f} ms at 0 ms RTT, {idle_1:.1f} ms at 1 ms), at {label_rtt(rtt)} (PING p50 through "
        f"the proxy {rtts[rtt]:.2f} ms) about {waiting:.1f} ms of waiting for Redis; the other "
        f"{idle - waiting:.1f} ms are CPU on the path, one step after another: the web process "
        f"(the POST, then the long poll's reads) and the worker (take, start, the horse's run, "
        f"finish) — bench.costs gives each process's CPU ms per job"
    )


def worker_note(workers: int, runs: Runs, rtts: dict[float, float], label: str) -> str:
    """What stands in the way of keeping throughput at 1 ms: the time each job adds to a worker."""
    slower = workers / runs[1.0, label].rate - workers / runs[0.0, label].rate
    trips = slower * 1000 / rtts_added(rtts, 1.0)
    return (
        f"{label}: under load each of the {workers} workers spends {slower * 1000:.1f} ms more per job "
        f"at 1 ms RTT, {trips:.1f} round trips' worth: a worker makes its round trips one after "
        f"another (take, start, finish and the state write between jobs, counted in bench.costs), "
        f"so at RTT r it cannot run more than 1 / (its CPU per job + r x those round trips) jobs a "
        f"second; {critical_path_note(runs, rtts, label)}"
    )


def critical_path_note(runs: Runs, rtts: dict[float, float], label: str) -> str:
    """What stands in the way at 1 ms, from the idle runs: round trips on the critical path."""
    if (0.0, label) not in runs or (1.0, label) not in runs:
        return ""
    idle_0, idle_1 = median(runs[0.0, label].idle), median(runs[1.0, label].idle)
    trips = (idle_1 - idle_0) * 1000 / rtts_added(rtts, 1.0)
    return (
        f"{label}: an idle job's POST -> finished grows from {idle_0 * 1000:.1f} ms at 0 ms RTT to "
        f"{idle_1 * 1000:.1f} ms at 1 ms: {trips:.1f} round trips on its critical path "
        f"(bench.costs counts them per path)"
    )


if __name__ == "__main__":
    main()
