"""Slow clients: /healthz and POST /jobs/log latency while hundreds of connections stall.

    .venv/bin/python -m bench.slow_clients [--sockets 500] [--probes 1000] [--server SETUP ...]

Each setup is the Procfile's web process (gunicorn.conf.py, WEB_CONCURRENCY=2, WEB_THREADS=16)
with only the worker class changed: `ours` is the configuration as deployed, `gthread` is
gunicorn's threaded worker as it ran before (the comparison shows what the change buys).
`--sockets` connections each send a partial request (a request line and one unfinished
header) and then stay silent; meanwhile `--probes` requests of each kind, every one on a new
connection as a new client would make it, are timed from four client threads. A probe that
fails or takes longer than 5 s counts as 5 s. Target: p99 <= 250 ms for both while the
sockets stall. The run also reports how long the server keeps a stalled socket open.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.common import bench_parser, database, env_for, ms, percentile, result
from scripts.embedded_redis import free_port
from scripts.processes import Process, wait_until
from scripts.stack import procfile_command, serves

PROBE_TIMEOUT = 5.0
PARTIAL_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Stalled: "
SETUPS = {
    "ours": "",  # the Procfile's command as it is
    "gthread": "--worker-class gthread",  # gunicorn's threaded worker, the setup before
}


def open_stalled(port: int, count: int) -> list[socket.socket]:
    """`count` connections that sent part of a request and then say nothing."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(PARTIAL_REQUEST)
        sockets.append(sock)
    return sockets


def probe(base: str, total: int, budget: float = 120) -> dict[str, list[float]]:
    """`total` GET /healthz and `total` POST /jobs/log, each on a new connection, from 4 threads.

    Stops early after `budget` seconds (a stalled server would otherwise take 5 s a probe).
    """
    latencies: dict[str, list[float]] = {"healthz": [], "enqueue": []}
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(2 * total))
    stop_at = time.monotonic() + budget

    def client() -> None:
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            kind = "healthz" if i % 2 else "enqueue"
            started = time.perf_counter()
            try:
                if kind == "healthz":
                    response = requests.get(base + "/healthz", timeout=PROBE_TIMEOUT)
                else:
                    response = requests.post(
                        base + "/jobs/log", json={"message": f"probe {i}"}, timeout=PROBE_TIMEOUT
                    )
                ok = response.status_code in (200, 202)
                took = time.perf_counter() - started
            except requests.RequestException as error:
                ok, took = False, PROBE_TIMEOUT
                with lock:
                    failures.append(type(error).__name__)
            with lock:
                latencies[kind].append(took if ok else PROBE_TIMEOUT)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        print(f"    {len(failures)} probes failed ({', '.join(sorted(set(failures)))})")
    return latencies


def held_for(sockets: list[socket.socket], started: float, limit: float) -> float | None:
    """Seconds from `started` until the server closed (or answered) every stalled socket.

    None if some were still open after `limit` seconds.
    """
    remaining = list(sockets)
    while remaining and time.monotonic() - started < limit:
        still = []
        for sock in remaining:
            sock.settimeout(0)
            try:
                if sock.recv(4096) == b"":
                    continue  # closed
                continue  # the server answered (a 408), which is as good
            except BlockingIOError:
                still.append(sock)
            except OSError:
                continue
        remaining = still
        time.sleep(0.1)
    return None if remaining else time.monotonic() - started


def run_setup(db, tmp: Path, name: str, sockets: int, probes: int) -> dict[str, object]:
    port = free_port()
    env = dict(env_for(db, tmp), HOST="127.0.0.1", PORT=str(port))
    command = f"{procfile_command('web')} {SETUPS[name]}".strip()
    process = Process(f"web-{name}", command, env, tmp / f"web-{name}.log")
    base = f"http://127.0.0.1:{port}"
    stalled: list[socket.socket] = []
    try:
        wait_until(lambda: serves(process, port, base + "/healthz"), what=f"web ({name})", process=process)
        probe(base, 100)  # warm up
        quiet = probe(base, probes)
        opened = time.monotonic()
        stalled = open_stalled(port, sockets)
        time.sleep(1)  # let the server take them all in
        loaded = probe(base, probes)
        held = held_for(stalled, opened, limit=120)
        return {"quiet": quiet, "loaded": loaded, "held": held}
    finally:
        for sock in stalled:
            sock.close()
        process.kill()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--server", choices=sorted(SETUPS), action="append")
    args = parser.parse_args()
    setups = args.server or ["gthread", "ours"]
    figures = {}
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        for name in setups:
            figures[name] = run_setup(db, Path(tmp), name, args.sockets, args.probes)
            db.flush()
    print(f"Slow clients: {args.sockets} stalled connections, {args.probes} probes of each kind")
    for name in setups:
        for phase in ("quiet", "loaded"):
            samples = figures[name][phase]
            print(
                f"  {name:8s} {phase:6s}  /healthz p50 {ms(percentile(samples['healthz'], 0.5))} "
                f"p99 {ms(percentile(samples['healthz'], 0.99))}   POST /jobs/log p50 "
                f"{ms(percentile(samples['enqueue'], 0.5))} p99 {ms(percentile(samples['enqueue'], 0.99))}"
            )
        held = figures[name]["held"]
        held_text = "over 120 s" if held is None else f"{held:.1f} s"
        print(f"  {name:8s} stalled sockets closed by the server after: {held_text}")
    if "ours" in figures:
        loaded = figures["ours"]["loaded"]
        worst = max(percentile(loaded["healthz"], 0.99) or 0, percentile(loaded["enqueue"], 0.99) or 0)
        print(f"  ours: worst p99 under stalled sockets {ms(worst)} (target <= 250 ms)")
        result(
            "slow_clients",
            baseline="gunicorn gthread" if "gthread" in figures else None,
            ours=f"p99 {worst * 1000:.0f} ms with {args.sockets} stalled connections",
        )


if __name__ == "__main__":
    main()
