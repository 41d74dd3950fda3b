"""Slow clients: /healthz and POST /jobs/log latency while hundreds of connections stall or drip.

    .venv/bin/python -m bench.slow_clients [--sockets 500] [--drippers 80] [--probes 1000]
        [--server SETUP ...]

Each setup is the Procfile's web process (gunicorn.conf.py, WEB_CONCURRENCY=2, WEB_THREADS=16)
with only the worker class changed: `ours` is the configuration as deployed, `gthread` is
gunicorn's threaded worker as it ran before (the comparison shows what the change buys).
Meanwhile requests of each kind, every one on a new connection as a new client would make
it, are timed; a probe that fails or takes longer than 5 s counts as 5 s. Phases:

- `stalled`: `--sockets` connections each send a partial request (a request line and one
  unfinished header) and then stay silent; `--probes` probes of each kind.
- `dripping`: `--drippers` connections of each attack in ATTACKS at once (a head over 64 KiB,
  a 2 MiB Content-Length, a chunked body past MAX_BODY_BYTES, a small body), each sending
  one more byte or header line every 4 s; probes run for as long as the small bodies are
  still arriving (until just before REQUEST_TIMEOUT), and the run reports what each attack
  was answered and how soon its connection was closed.

Target: p99 <= 250 ms for both probe kinds in every phase.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import requests

from bench.common import bench_parser, database, env_for, ms, percentile, result
from jobs.settings import Settings
from scripts.embedded_redis import free_port
from scripts.processes import Process, wait_until
from scripts.stack import procfile_command, serves
from webserver.worker import REQUEST_TIMEOUT

PROBE_TIMEOUT = 5.0
PARTIAL_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Stalled: "
SETUPS = {
    "ours": "",  # the Procfile's command as it is
    "gthread": "--worker-class gthread",  # gunicorn's threaded worker, the setup before
}

# ---------------------------------------------------------------- clients that drip

# Seconds between two drips of an attacking connection: well inside any per-read timeout.
DRIP_EVERY = 4.0
MAX_BODY = Settings.max_body_bytes  # the web process's limit: the tests and this run keep the default
_POST = b"POST /jobs/log HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def _big_head() -> tuple[bytes, Callable[[int], bytes]]:
    # 70 header lines of 1 KB: each within gunicorn's own field limits, over 64 KiB together.
    fill = b"".join(b"X-Fill-%02d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
    return b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fill, lambda n: b"X-Drip-%d: a\r\n" % n


def _big_length() -> tuple[bytes, Callable[[int], bytes]]:
    return _POST + b"Content-Length: %d\r\n\r\n" % (2 * MAX_BODY), lambda n: b"a"


def _big_chunked() -> tuple[bytes, Callable[[int], bytes]]:
    # MAX_BODY bytes in 64 KiB chunks, then a chunk that takes the body past it, sent a byte at a time.
    chunks = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
    return _POST + b"Transfer-Encoding: chunked\r\n\r\n" + chunks * (MAX_BODY // 0x10000) + b"1000\r\n", (
        lambda n: b"a"
    )


def _slow_body() -> tuple[bytes, Callable[[int], bytes]]:
    return _POST + b'Content-Length: 1000\r\n\r\n{"message": "', lambda n: b"a"


def _never_closed() -> tuple[bytes, Callable[[int], bytes]]:
    # A whole request that asks to close the connection, from a client that never closes it.
    return b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", lambda n: b"a"


# Attack name: (the status its connection must end with, the request's first bytes and drips).
ATTACKS: dict[str, tuple[int, Callable[[], tuple[bytes, Callable[[int], bytes]]]]] = {
    "head over 64 KiB": (431, _big_head),
    "Content-Length 2 MiB": (413, _big_length),
    "chunked past 1 MiB": (413, _big_chunked),
    "small body, dripped": (408, _slow_body),
    "Connection: close, never closed": (200, _never_closed),
}


class Attacker:
    """A connection that sends its burst as fast as the server takes it, then a drip every DRIP_EVERY s.

    With `tls`, the connection first completes a TLS handshake, and sends and reads through it.
    """

    def __init__(
        self,
        attack: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        how: tuple[int | None, bytes, Callable[[int], bytes]] | None = None,
    ) -> None:
        self.attack = attack
        if how is None:
            self.expected, (burst, self.drip) = ATTACKS[attack][0], ATTACKS[attack][1]()
        else:
            self.expected, burst, self.drip = how
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.sock.setblocking(False)
        self.opened = time.monotonic()
        self.pending = bytearray(burst)
        self.burst_sent: float | None = None  # when the last byte of the burst was sent
        self.answer = bytearray()
        self.closed: float | None = None  # when the server closed the connection (EOF or reset)
        self.drips = 0

    def send(self) -> None:
        try:
            sent = self.sock.send(self.pending[:262144])
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            self.pending.clear()  # the server closed its side: what it answered is read next
            self.burst_sent = self.burst_sent or time.monotonic()
            return
        del self.pending[:sent]
        if not self.pending and self.burst_sent is None:
            self.burst_sent = time.monotonic()

    def receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:
                data = b""
            if not data:
                self.closed = time.monotonic()
                return
            self.answer += data
            if not isinstance(self.sock, ssl.SSLSocket) or not self.sock.pending():
                return

    def status(self) -> int | None:
        line = bytes(self.answer).partition(b"\r\n")[0].split()
        return int(line[1]) if len(line) > 1 and line[1].isdigit() else None

    def header(self, name: str) -> str | None:
        head = bytes(self.answer).partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
        for line in head:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def body(self) -> bytes:
        return bytes(self.answer).partition(b"\r\n\r\n")[2]

    def close(self) -> None:
        self.sock.close()


def open_attackers(port: int, per_attack: int, tls: ssl.SSLContext | None = None) -> list[Attacker]:
    return [Attacker(attack, port, tls) for _ in range(per_attack) for attack in ATTACKS]


def drive(attackers: list[Attacker], until: float) -> None:
    """Send each attacker's burst, then a drip every DRIP_EVERY s; read what the server answers.

    Returns at `until`, or once the server has closed every connection.
    """
    selector = selectors.DefaultSelector()
    for attacker in attackers:
        selector.register(attacker.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, attacker)
    open_ = set(attackers)
    next_drip = time.monotonic() + DRIP_EVERY
    try:
        while open_ and time.monotonic() < until:
            for key, events in selector.select(timeout=0.1):
                attacker = key.data
                if events & selectors.EVENT_READ:
                    attacker.receive()
                if events & selectors.EVENT_WRITE and attacker.pending:
                    attacker.send()
                if attacker.closed is not None:
                    selector.unregister(attacker.sock)
                    open_.discard(attacker)
                elif not attacker.pending and events & selectors.EVENT_WRITE:
                    selector.modify(attacker.sock, selectors.EVENT_READ, attacker)
            if time.monotonic() >= next_drip:
                next_drip += DRIP_EVERY
                for attacker in open_:
                    if not attacker.pending and attacker.burst_sent is not None:
                        attacker.pending += attacker.drip(attacker.drips)
                        attacker.drips += 1
                        selector.modify(attacker.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, attacker)
    finally:
        selector.close()


def outcomes(attackers: list[Attacker]) -> dict[str, str]:
    """Per attack: the statuses its connections got, and how long after its burst the server closed them."""
    summary = {}
    for attack in ATTACKS:
        group = [a for a in attackers if a.attack == attack]
        statuses = Counter(str(a.status() or "none") for a in group)
        after = sorted(a.closed - (a.burst_sent or a.opened) for a in group if a.closed is not None)
        still = len(group) - len(after)
        closed = f"closed {after[0]:.1f}-{after[-1]:.1f} s after the burst" if after else "none closed"
        summary[attack] = f"{', '.join(f'{n} x {s}' for s, n in sorted(statuses.items()))}; {closed}" + (
            f", {still} still open" if still else ""
        )
    return summary


# ---------------------------------------------------------------- probes


def probe_once(base: str, kind: str, i: int, verify: str | bool = True) -> float | None:
    """Seconds one probe took on a new connection, or None if it failed."""
    started = time.perf_counter()
    try:
        if kind == "healthz":
            response = requests.get(base + "/healthz", timeout=PROBE_TIMEOUT, verify=verify)
        else:
            body = {"message": f"probe {i}"}
            response = requests.post(base + "/jobs/log", json=body, timeout=PROBE_TIMEOUT, verify=verify)
    except requests.RequestException:
        return None
    return time.perf_counter() - started if response.status_code in (200, 202) else None


def probe(base: str, total: int, budget: float = 120) -> dict[str, list[float]]:
    """`total` GET /healthz and `total` POST /jobs/log, each on a new connection, from 4 threads.

    Stops early after `budget` seconds (a stalled server would otherwise take 5 s a probe).
    """
    latencies: dict[str, list[float]] = {"healthz": [], "enqueue": []}
    lock = threading.Lock()
    counter = iter(range(2 * total))
    stop_at = time.monotonic() + budget
    failures = 0

    def client() -> None:
        nonlocal failures
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            kind = "healthz" if i % 2 else "enqueue"
            took = probe_once(base, kind, i)
            with lock:
                failures += took is None
                latencies[kind].append(PROBE_TIMEOUT if took is None else took)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        print(f"    {failures} probes failed")
    return latencies


def probe_until(
    base: str, stop_at: float, pause: float = 0.01, verify: str | bool = True
) -> dict[str, list[float]]:
    """Probes of each kind, one after another from a thread per kind, until `stop_at`."""
    latencies: dict[str, list[float]] = {"healthz": [], "enqueue": []}

    def client(kind: str) -> None:
        i = 0
        while time.monotonic() < stop_at:
            took = probe_once(base, kind, i, verify)
            latencies[kind].append(PROBE_TIMEOUT if took is None else took)
            i += 1
            time.sleep(pause)

    threads = [threading.Thread(target=client, args=(kind,)) for kind in latencies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def p99(samples: list[float]) -> float:
    """The 99th percentile, from however many samples there are (the worst one below 100)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


# ---------------------------------------------------------------- a run


def open_stalled(port: int, count: int) -> list[socket.socket]:
    """`count` connections that sent part of a request and then say nothing."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(PARTIAL_REQUEST)
        sockets.append(sock)
    return sockets


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
                sock.recv(4096)  # closed, or answered (a 408): either is as good
            except BlockingIOError:
                still.append(sock)
            except OSError:
                continue
        remaining = still
        time.sleep(0.1)
    return None if remaining else time.monotonic() - started


def dripping_phase(
    base: str, attackers: list[Attacker], probe_until_: float, drive_until: float, verify: str | bool = True
) -> dict[str, list[float]]:
    """Probe latencies while `attackers` drip; they are closed after, what they got kept.

    The attackers send their bursts first, and the server is given a second to take them in
    (tens of megabytes); probes run from then until `probe_until_`, and the attackers keep
    dripping (and reading their answers) until `drive_until` or until all are closed.
    """
    driver = threading.Thread(target=drive, args=(attackers, drive_until))
    try:
        driver.start()
        bursts_by = time.monotonic() + 10  # a server that does not read them may never take them all
        while time.monotonic() < bursts_by and not all(a.burst_sent or a.closed for a in attackers):
            time.sleep(0.05)
        time.sleep(1)
        return probe_until(base, probe_until_, verify=verify)
    finally:
        driver.join()
        for attacker in attackers:
            attacker.close()


def run_setup(db, tmp: Path, name: str, sockets: int, drippers: int, probes: int) -> dict[str, object]:
    port = free_port()
    env = dict(env_for(db, tmp), HOST="127.0.0.1", PORT=str(port))
    command = f"{procfile_command('web')} {SETUPS[name]}".strip()
    process = Process(f"web-{name}", command, env, tmp / f"web-{name}.log")
    base = f"http://127.0.0.1:{port}"
    stalled: list[socket.socket] = []
    try:
        wait_until(lambda: serves(process, port, base + "/healthz"), what=f"web ({name})", process=process)
        probe(base, 100)  # warm up
        figures: dict[str, object] = {"quiet": probe(base, probes)}
        opened = time.monotonic()
        stalled = open_stalled(port, sockets)
        time.sleep(1)  # let the server take them all in
        figures["stalled"] = probe(base, probes)
        figures["held"] = held_for(stalled, opened, limit=120)
        for sock in stalled:
            sock.close()
        if drippers:
            wait_until(lambda: serves(process, port, base + "/healthz"), what=f"web ({name}) to recover")
            attackers = open_attackers(port, drippers)
            opened = min(attacker.opened for attacker in attackers)
            # Probes while the small bodies still drip; then their 408s are awaited.
            until = (opened + REQUEST_TIMEOUT - 1, opened + REQUEST_TIMEOUT + 10)
            figures["dripping"] = dripping_phase(base, attackers, *until)
            figures["attacks"] = outcomes(attackers)
        return figures
    finally:
        for sock in stalled:
            sock.close()
        process.kill()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--drippers", type=int, default=80, help="connections per dripping attack (0: none)")
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--server", choices=sorted(SETUPS), action="append")
    args = parser.parse_args()
    setups = args.server or ["gthread", "ours"]
    figures = {}
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        for name in setups:
            figures[name] = run_setup(db, Path(tmp), name, args.sockets, args.drippers, args.probes)
            db.flush()
    print(
        f"Slow clients: {args.sockets} stalled connections, {args.probes} probes of each kind; "
        f"{args.drippers} dripping connections of each of {len(ATTACKS)} attacks"
    )
    for name in setups:
        for phase in ("quiet", "stalled", "dripping"):
            samples = figures[name].get(phase)
            if samples is None:
                continue
            print(
                f"  {name:8s} {phase:8s}  /healthz p50 {ms(percentile(samples['healthz'], 0.5))} "
                f"p99 {ms(p99(samples['healthz']))}   POST /jobs/log p50 "
                f"{ms(percentile(samples['enqueue'], 0.5))} p99 {ms(p99(samples['enqueue']))}   "
                f"({len(samples['healthz'])} + {len(samples['enqueue'])} probes)"
            )
        held = figures[name]["held"]
        held_text = "over 120 s" if held is None else f"{held:.1f} s"
        print(f"  {name:8s} stalled sockets closed by the server after: {held_text}")
        for attack, outcome in figures[name].get("attacks", {}).items():
            print(f"  {name:8s} {attack}: {outcome}")
    if "ours" in figures:
        phases = [figures["ours"][phase] for phase in ("stalled", "dripping") if phase in figures["ours"]]
        worst = max(p99(samples[kind]) for samples in phases for kind in ("healthz", "enqueue"))
        print(f"  ours: worst p99 under stalled and dripping connections {ms(worst)} (target <= 250 ms)")
        result(
            "slow_clients",
            baseline="gunicorn gthread" if "gthread" in figures else None,
            ours=f"p99 {worst * 1000:.0f} ms with {args.sockets} stalled, "
            f"{len(ATTACKS) * args.drippers} dripping connections",
        )


if __name__ == "__main__":
    main()
