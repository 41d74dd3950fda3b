"""Do long-polling clients starve other requests? Gunicorn's default sync workers vs ours.

    .venv/bin/python -m bench.longpoll [--pollers 40] [--seconds 3]

Starts the web process twice, 2 processes each: once as the Procfile runs it (gthread,
16 threads, at most 12 of them waiting), once with gunicorn's default `sync` worker class.
Each time one client sends GET /jobs/<id> and POST /jobs/log requests back to back for
`--seconds`, first alone, then while `--pollers` clients long-poll a job that never ends.
"""

from __future__ import annotations

import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

import requests

from bench.common import bench_parser, database, result
from scripts.stack import WebService, procfile_env


def traffic(web: WebService, job_id: str, seconds: float) -> tuple[list[float], int]:
    """Latencies of the requests that succeeded within `seconds`, and how many failed."""
    session = requests.Session()
    latencies, failures, i = [], 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            if i % 2:
                session.get(web.url(f"/jobs/{job_id}"), timeout=seconds).raise_for_status()
            else:
                session.post(
                    web.url("/jobs/log"), json={"message": "bench"}, timeout=seconds
                ).raise_for_status()
            latencies.append(time.perf_counter() - started)
        except requests.RequestException:
            failures += 1
        i += 1
    return latencies, failures


def long_poll(url: str) -> None:
    with suppress(requests.RequestException):
        requests.get(url, timeout=120)


def measure(label: str, env: dict, tmp: Path, pollers: int, seconds: float) -> tuple[str, float]:
    web = WebService(env, tmp)
    try:
        job_id = web.post_job("sleep", {"seconds": 60}).json()["id"]  # no worker runs: it never ends
        idle, _ = traffic(web, job_id, seconds)
        for _ in range(pollers):
            url = web.url(f"/jobs/{job_id}?wait=60")
            threading.Thread(target=long_poll, args=(url,), daemon=True).start()
        time.sleep(1)
        loaded, failures = traffic(web, job_id, seconds)
    finally:
        web.process.kill()
    idle_rate, loaded_rate = len(idle) / seconds, len(loaded) / seconds
    p50 = sorted(loaded)[len(loaded) // 2] * 1000 if loaded else float("nan")
    line = (
        f"  {label:34s} alone {idle_rate:6.0f} req/s | while polled {loaded_rate:6.0f} req/s "
        f"(p50 {p50:6.1f} ms, {failures} timed out) | ratio {loaded_rate / idle_rate:4.2f}"
    )
    return line, loaded_rate / idle_rate


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--pollers", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=3)
    args = parser.parse_args()
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        env = procfile_env(db.url, Path(tmp), WEB_CONCURRENCY=2)
        ours = measure("Procfile (gthread, capped waits)", env, Path(tmp), args.pollers, args.seconds)
        db.flush()
        sync = dict(env, GUNICORN_CMD_ARGS="--worker-class sync --threads 1")
        baseline = measure("gunicorn default (sync workers)", sync, Path(tmp), args.pollers, args.seconds)
    print(
        f"{args.pollers} clients long-polling a job that does not end; other requests for {args.seconds:g} s"
    )
    print(ours[0])
    print(baseline[0])
    result(
        "longpoll",
        baseline=f"gunicorn sync workers: {baseline[1]:.2f} of their idle throughput",
        ours=f"{ours[1]:.2f} of its idle throughput",
    )


if __name__ == "__main__":
    main()
