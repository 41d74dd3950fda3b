"""2. HTTP enqueue: Afterward's POST /jobs/log vs a minimal Flask + `queue.enqueue` endpoint.

    .venv/bin/python -m bench.enqueue [--requests 4000] [--clients 16]

Both run under the same gunicorn settings (gunicorn.conf.py: 2 processes, gthread). Afterward
runs with everything on and every limit at its default: each client an API key of its own on
every request, a fresh Idempotency-Key on each, the rate limiter counting in Redis, full
validation. Target: >= 0.8x the naive throughput.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import requests

from bench.common import ClientKeys, bench_parser, database, env_for, ms, percentile, result, run_clients
from scripts.embedded_redis import free_port
from scripts.processes import Process, wait_until
from scripts.stack import WebService

Result = tuple[float, list[float]]  # requests/s, latencies (s)


def measure(base: str, total: int, clients: int, keys: ClientKeys | None) -> Result:
    def call(session: requests.Session, i: int) -> None:
        headers = {**keys.headers(session), "Idempotency-Key": uuid.uuid4().hex} if keys else {}
        response = session.post(
            base + "/jobs/log", json={"message": f"enqueue {i}"}, headers=headers, timeout=30
        )
        assert response.status_code == 202, response.text

    run_clients(clients, min(200, total), call)  # warm both up the same way
    started = time.perf_counter()
    latencies = run_clients(clients, total, call)
    return total / (time.perf_counter() - started), latencies


def naive(db, tmp: Path, total: int, clients: int) -> Result:
    port = free_port()
    env = dict(env_for(db, tmp), HOST="127.0.0.1", PORT=str(port))
    command = "gunicorn --config gunicorn.conf.py 'bench.naive_app:create_app()'"
    process = Process("naive", command, env, tmp / "naive.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(base), timeout=30, what="the naive app", process=process)
        return measure(base, total, clients, None)
    finally:
        process.kill()


def afterward(db, tmp: Path, total: int, clients: int) -> Result:
    keys = ClientKeys(clients)
    web = WebService(env_for(db, tmp, API_KEYS=keys.setting), tmp)
    try:
        return measure(web.base, total, clients, keys)
    finally:
        web.process.kill()


def _answers(base: str) -> bool:
    try:
        return requests.post(base + "/jobs/log", json={"message": "ping"}, timeout=1).status_code == 202
    except requests.ConnectionError:
        return False


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        baseline = naive(db, Path(tmp), args.requests, args.clients)
        db.flush()
        ours = afterward(db, Path(tmp), args.requests, args.clients)
    print(f"HTTP enqueue, {args.requests} POSTs from {args.clients} clients")
    for label, (rate, latencies) in (
        ("naive Flask + queue.enqueue", baseline),
        ("Afterward POST /jobs/log", ours),
    ):
        print(
            f"  {label:30s} {rate:7.0f} req/s   p50 {ms(percentile(latencies, 0.5))}   "
            f"p99 {ms(percentile(latencies, 0.99))}"
        )
    print(f"  ratio: {ours[0] / baseline[0]:.2f}x the naive throughput (target >= 0.8x)")
    result(
        "enqueue",
        baseline=f"naive Flask + queue.enqueue: {baseline[0]:.0f} req/s",
        ours=f"{ours[0]:.0f} req/s",
        ratio=round(ours[0] / baseline[0], 2),
    )


if __name__ == "__main__":
    main()
