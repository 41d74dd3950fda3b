"""Completion webhooks: how long after a job's end its delivery reaches a receiver, under load.

    .venv/bin/python -m bench.webhooks [--jobs 4000] [--clients 16] [--hogs 4]

Afterward as the Procfile runs it: the web process (2 gunicorn processes) and `rq worker-pool`
with 2 workers, every setting at its default, CALLBACK_SECRET set and 127.0.0.1 in
CALLBACK_ALLOWED_HOSTS. A receiver on 127.0.0.1 notes when each delivery arrives.

Each of `--clients` client threads (an API key each) submits a log job and long-polls it to
its end, again and again. Three jobs in ten carry a `callback_url` to the receiver; of those,
most finish, one job in 50 is submitted delayed and canceled through the API (`canceled`, an
end recorded by the web process) and one in 200 runs past its timeout (`failed`).

The latency of a delivery: from the job's `ended_at` (in the delivered job view) to the first
arrival of its `Afterward-Delivery` id at the receiver. Two runs on one stack: the machine as
it is, then with `--hogs` processes spinning on the CPU beside it.

The bound: deliveries leave within a second of the job's end, so the ratio is p99 / 1 s (the
max / 1 s where there are too few samples for a p99).
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from bench.common import (
    ClientKeys,
    bench_parser,
    database,
    env_for,
    median,
    ms,
    percentile,
    result,
    run_clients,
    service,
)
from jobs.times import parse_iso
from scripts.processes import Process, wait_until

TERMINAL = {"finished", "failed", "canceled", "stopped"}
BOUND = 1.0  # seconds from a job's end to its delivery
SECRET = "bench-callback-secret"


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 that notes when each delivery first arrives."""

    daemon_threads = True
    request_queue_size = 512  # the default, 5, drops connections under a burst of deliveries

    def __init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.time()
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.note(self.headers["Afterward-Delivery"], arrived, body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.arrivals: dict[str, tuple[float, dict]] = {}  # delivery id -> (first arrival, job view)
        self.thread = threading.Thread(target=self.serve_forever, name="receiver", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/hook"

    def note(self, delivery: str, arrived: float, body: bytes) -> None:
        with self.lock:
            if delivery not in self.arrivals:
                self.arrivals[delivery] = (arrived, json.loads(body))

    def take(self) -> list[tuple[float, dict]]:
        with self.lock:
            taken, self.arrivals = list(self.arrivals.values()), {}
        return taken

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


def kind_of(i: int) -> str:
    """What the i-th job is: 3 in 10 carry a callback; some of those fail or are canceled."""
    if i % 10 >= 3:
        return "plain"
    if i % 50 == 0:
        return "canceled"
    if i % 200 == 1:
        return "failed"
    return "finished"


def load(web, keys: ClientKeys, receiver: Receiver, jobs: int, clients: int) -> int:
    """Run `jobs` jobs through `clients` client threads; how many carry a callback."""

    def one(session: requests.Session, i: int) -> None:
        headers = keys.headers(session)
        kind = kind_of(i)
        body: dict = {"message": f"job {i}"}
        job_type = "log"
        if kind != "plain":
            body["callback_url"] = receiver.url
        if kind == "canceled":
            body["delay"] = 600
        elif kind == "failed":
            job_type, body = "sleep", {"seconds": 3, "timeout": 1, "callback_url": receiver.url}
        response = session.post(web.url(f"/jobs/{job_type}"), json=body, headers=headers, timeout=30)
        assert response.status_code == 202, response.text
        location = web.url(response.headers["Location"])
        if kind == "canceled":
            answer = session.delete(location, headers=headers, timeout=30)
            assert answer.status_code == 200 and answer.json()["status"] == "canceled", answer.text
            return
        while True:
            view = session.get(location, params={"wait": 30}, headers=headers, timeout=60).json()
            if view["status"] in TERMINAL:
                assert view["status"] == ("failed" if kind == "failed" else "finished"), view
                return

    run_clients(clients, jobs, one)
    return sum(1 for i in range(jobs) if kind_of(i) != "plain")


def measure(label: str, web, keys, receiver: Receiver, jobs: int, clients: int) -> dict:
    started = time.perf_counter()
    expected = load(web, keys, receiver, jobs, clients)
    elapsed = time.perf_counter() - started
    with suppress(AssertionError):  # reported as missing below
        wait_until(lambda: len(receiver.arrivals) >= expected, timeout=60, what="every delivery")
    arrivals = receiver.take()
    latencies = [at - parse_iso(view["ended_at"]).timestamp() for at, view in arrivals]
    by_status: dict[str, list[float]] = {}
    for latency, (_, view) in zip(latencies, arrivals, strict=True):
        by_status.setdefault(view["status"], []).append(latency)
    p99 = percentile(latencies, 0.99)
    figures = {
        "label": label,
        "jobs/s": jobs / elapsed,
        "deliveries": len(latencies),
        "missing": expected - len(latencies),
        "p50": median(latencies) if latencies else None,
        "p99": p99,
        "max": max(latencies) if latencies else None,
        "by_status": {status: (len(values), max(values)) for status, values in sorted(by_status.items())},
    }
    print(
        f"  {label:28s} {figures['jobs/s']:6.1f} jobs/s | {figures['deliveries']} deliveries "
        f"({figures['missing']} missing) | end -> arrival p50 {ms(figures['p50'])}, "
        f"p99 {ms(p99)}, max {ms(figures['max'])}",
        flush=True,
    )
    for status, (count, worst) in figures["by_status"].items():
        print(f"  {'':28s}   {status:9s} {count:5d} deliveries, max {ms(worst)}", flush=True)
    return figures


def report(name: str, figures: dict) -> None:
    figure = figures["p99"] if figures["p99"] is not None else figures["max"]
    which = "p99" if figures["p99"] is not None else "max (too few for a p99)"
    result(
        name,
        baseline=f"the bound: {BOUND:g} s from a job's end",
        ours=(
            f"p50 {ms(figures['p50'])}, p99 {ms(figures['p99'])}, max {ms(figures['max'])}; "
            f"{figures['deliveries']} deliveries, {figures['missing']} missing; ratio of the {which}"
        ),
        ratio=None if figure is None else round(figure / BOUND, 2),
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=4000, help="jobs per run (3 in 10 with a callback)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hogs", type=int, default=4, help="CPU-spinning processes in the busy run")
    args = parser.parse_args()
    receiver = Receiver()
    keys = ClientKeys(args.clients)
    hogs: list[Process] = []
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = env_for(
            db, tmp_path, API_KEYS=keys.setting, CALLBACK_SECRET=SECRET, CALLBACK_ALLOWED_HOSTS="127.0.0.1"
        )
        try:
            with service(env, tmp_path, workers=args.workers) as web:
                print(
                    f"{args.jobs} jobs a run from {args.clients} clients, {args.workers} workers, "
                    f"3 in 10 with a callback to a receiver on 127.0.0.1",
                    flush=True,
                )
                quiet = measure("machine as it is", web, keys, receiver, args.jobs, args.clients)
                for n in range(args.hogs):
                    command = f"{sys.executable} -c 'while True: pass'"
                    hogs.append(Process("hog", command, env, tmp_path / f"hog-{n}.log"))
                busy = measure(
                    f"{args.hogs} CPU hogs beside it", web, keys, receiver, args.jobs, args.clients
                )
        finally:
            for hog in hogs:
                hog.kill()
            receiver.close()
    report("webhooks: job end -> delivery", quiet)
    report("webhooks: job end -> delivery, CPU hogs", busy)


if __name__ == "__main__":
    main()
