"""Operator endpoints among many tenants: GET /queues and a bulk retry with other keys' failures.

    .venv/bin/python -m bench.operators [--failed 100000] [--calls 400] [--clients 8]

The Procfile's web process with two API keys. Key B has `--failed` failed jobs (half of them
stopped) in RQ's failed registries, copies of a job that really failed; key A has none. With
`--clients` clients at once, key A calls `GET /queues` and `POST /jobs/retry` (`{}`: its failed
jobs, of which it has none) `--calls` times each, while a process of its own PINGs Redis.
The baseline is the same calls before key B's jobs exist: an endpoint that costs what the
caller owns takes as long either way. Targets, as ratios to their budgets: each call under
50 ms at p99 (the ratio is p99 / 50 ms), and Redis's PING under 5 ms at p99 meanwhile. The
former versions walked every failed job on each call (270 ms of blocked Redis per
`GET /queues` at 100,000, 1.1 to 1.8 s per bulk retry).
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import redis
import requests

from bench.common import bench_parser, database, env_for, ms, percentile, result, run_clients, service
from scripts.processes import wait_until

KEY_A, KEY_B = "operator-bench-key-a-0123456789", "operator-bench-key-b-0123456789"
CALL_BUDGET, PING_BUDGET = 0.050, 0.005
COPY_BATCH = 2000


def seed_failures(db, web, count: int) -> None:
    """`count` failed jobs of key B: one that failed for real, copied under new ids, with
    every index a failure writes (the failed registry, the stopped count, B's own index)."""
    headers = {"Authorization": f"Bearer {KEY_B}"}
    body = {"message": "x", "timeout": 1}
    job_id = requests.post(web.url("/jobs/log"), json=body, headers=headers, timeout=30).json()["id"]
    client = db.client()
    wait_until(lambda: client.hget(f"rq:job:{job_id}", "status") == b"finished", what="the model job")
    template = client.hgetall(f"rq:job:{job_id}")
    owner = json.loads(template[b"meta"])["owner"]
    now = time.time()
    for start in range(0, count, COPY_BATCH):
        with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(count, start + COPY_BATCH)):
                copy = f"{i:032x}"
                status = b"stopped" if i % 2 else b"failed"
                pipe.hset(f"rq:job:{copy}", mapping={**template, b"status": status})
                pipe.zadd("rq:failed:default", {copy: now + 86400})
                if i % 2:
                    pipe.zadd("afterward:stopped:default", {copy: now + 86400})
                pipe.zadd(f"afterward:retryable:{owner}:{status.decode()}", {copy: now})
            pipe.execute()


def ping(url: str, stop, latencies) -> None:
    """PINGs Redis every half millisecond, from a process of its own (in the load's process,
    its threads would measure their own turns on the interpreter lock)."""
    connection = redis.Redis.from_url(url)
    measured = []
    while not stop.wait(0.0005):
        started = time.perf_counter()
        connection.ping()
        measured.append(time.perf_counter() - started)
    latencies.send(measured)


def measure(web, calls: int, clients: int, url: str) -> tuple[dict, list[float]]:
    """Latencies of key A's two calls, and of PINGs meanwhile."""
    headers = {"Authorization": f"Bearer {KEY_A}"}

    def queues(session: requests.Session, i: int) -> None:
        assert session.get(web.url("/queues"), headers=headers, timeout=30).status_code == 200

    def retry(session: requests.Session, i: int) -> None:
        answer = session.post(web.url("/jobs/retry"), json={}, headers=headers, timeout=30)
        assert answer.status_code == 200 and answer.json()["retried"] == 0, answer.text

    stop = multiprocessing.Event()
    receive, send = multiprocessing.Pipe(duplex=False)
    pinger = multiprocessing.Process(target=ping, args=(url, stop, send))
    pinger.start()
    try:
        latencies = {"GET /queues": run_clients(clients, calls, queues)}
        latencies["POST /jobs/retry"] = run_clients(clients, calls, retry)
    finally:
        stop.set()
        pings = receive.recv()
        pinger.join()
    return latencies, pings


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--failed", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        env = env_for(db, Path(tmp), API_KEYS=f"{KEY_A},{KEY_B}", RATE_LIMIT="off")
        with service(env, Path(tmp), workers=1) as web:
            measure(web, min(args.calls, 40), args.clients, db.url)  # warm up
            before, pings_before = measure(web, args.calls, args.clients, db.url)
            seed_failures(db, web, args.failed)
            after, pings_after = measure(web, args.calls, args.clients, db.url)
    print(
        f"key A (no failed job) calls each endpoint {args.calls} times from {args.clients} clients; "
        f"key B holds {args.failed:,} failed and stopped jobs in the second run"
    )
    for name in before:
        p99_before, p99_after = percentile(before[name], 0.99), percentile(after[name], 0.99)
        p50_before, p50_after = percentile(before[name], 0.5), percentile(after[name], 0.5)
        print(
            f"  {name:17s} p50 {ms(p50_before)} -> {ms(p50_after)}, p99 {ms(p99_before)} -> {ms(p99_after)}"
        )
        result(
            f"operators: {name}",
            baseline=f"no other key's failures: p50 {ms(p50_before)}, p99 {ms(p99_before)}",
            ours=f"{args.failed:,} failures of another key: p50 {ms(p50_after)}, p99 {ms(p99_after)}",
            ratio=round((p99_after or max(after[name])) / CALL_BUDGET, 2),
        )
    ping_before, ping_after = percentile(pings_before, 0.99), percentile(pings_after, 0.99)
    print(
        f"  Redis PING meanwhile: p99 {ms(ping_before)} -> {ms(ping_after)}, "
        f"max {ms(max(pings_before))} -> {ms(max(pings_after))}"
    )
    result(
        "operators: Redis PING during the calls",
        baseline=f"no other key's failures: p99 {ms(ping_before)}",
        ours=f"{args.failed:,} failures of another key: p99 {ms(ping_after)}, max {ms(max(pings_after))}",
        ratio=round((ping_after or max(pings_after)) / PING_BUDGET, 2),
    )


if __name__ == "__main__":
    main()
