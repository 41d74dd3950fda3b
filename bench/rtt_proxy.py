"""A TCP proxy that puts a network's round-trip time between Redis and its clients.

    .venv/bin/python -m bench.rtt_proxy --delay-ms 0.5 TARGET_PORT [--port N] [--target-host H]

Listens on a loopback port and forwards every connection to TARGET_PORT, holding each chunk
of bytes for `--delay-ms` milliseconds in each direction, so a round trip costs twice that
(`tc netem` needs privileges a benchmark does not have). Each chunk is held from its own
arrival, in order: a pipeline of fifty commands costs one round trip, as on a network, and a
reply is never sent before the bytes that came before it. Opening a connection costs one
round trip too (TCP's handshake): the first bytes a client sends are held one round trip
longer. With delay 0, bytes pass at once.

The proxy runs in a process of its own (one asyncio thread, whose timers wait with select(),
to the microsecond, where epoll rounds up to a millisecond), so the benchmark's own threads
do not delay it. In Python:

    with RttProxy(redis_port, delay_ms=0.5) as proxy:
        redis.Redis.from_url(proxy.url(redis_url))
        proxy.set_rtt(2)  # from now on, for every connection: 1 ms each way
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import selectors
import signal
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from scripts.embedded_redis import free_port
from scripts.processes import ROOT, Process, wait_until


class Delay:
    """The one-way delay in seconds, which a running proxy may be told to change."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class _Direction(asyncio.Protocol):
    """One side of a proxied connection: what it receives goes, delayed, to its peer."""

    def __init__(self, delay: Delay, first_delay: float = 0.0) -> None:
        self.delay = delay
        self.first_delay = first_delay  # extra for the first chunk (the handshake's round trip)
        self.transport: asyncio.Transport | None = None
        self.peer: _Direction | None = None
        self.held: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        delay = self.delay.seconds + self.first_delay
        self.first_delay = 0.0
        if delay <= 0 and not self.held:
            self._send(data)
            return
        self.held.append((self.loop.time() + delay, data))
        if self.timer is None:
            self.timer = self.loop.call_at(self.held[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.held and self.held[0][0] <= now:
            self._send(self.held.popleft()[1])
        if self.held:
            self.timer = self.loop.call_at(self.held[0][0], self._release)
        elif self.closing:
            self._close_peer()

    def _send(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        # The peer is closed once every held byte has gone out to it.
        self.closing = True
        if not self.held:
            self._close_peer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.closing = True
            if not self.held:
                self._close_peer()

    def _close_peer(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Flow control: when the peer cannot take more, stop reading from this side.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Direction):
    """A client's connection: opens the connection to the target, then forwards both ways."""

    def __init__(self, delay: Delay, target: tuple[str, int]) -> None:
        super().__init__(delay, first_delay=2 * delay.seconds)
        self.target = target

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # until the target answers
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            _, upstream = await self.loop.create_connection(lambda: _Direction(self.delay), *self.target)
        except OSError:
            self.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        self.transport.resume_reading()


async def serve(
    target_port: int, delay_ms: float, port: int, target_host: str = "127.0.0.1", control: Path | None = None
) -> None:
    loop = asyncio.get_running_loop()
    delay = Delay(delay_ms / 1000)
    if control is not None:
        # SIGUSR1: take the delay written in the control file (RttProxy.set_delay).
        def reload() -> None:
            delay.seconds = float(control.read_text()) / 1000
            print(f"rtt_proxy: delay now {control.read_text().strip()} ms each way", flush=True)

        loop.add_signal_handler(signal.SIGUSR1, reload)
    server = await loop.create_server(
        lambda: _Client(delay, (target_host, target_port)), "127.0.0.1", port, reuse_address=True
    )
    print(f"rtt_proxy: 127.0.0.1:{port} -> {target_host}:{target_port}, {delay_ms} ms each way", flush=True)
    async with server:
        await server.serve_forever()


def run(
    target_port: int, delay_ms: float, port: int, target_host: str = "127.0.0.1", control: Path | None = None
) -> None:
    """Serve until killed, on an event loop whose timers keep microseconds (select, not epoll)."""
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(serve(target_port, delay_ms, port, target_host, control))
    finally:
        loop.close()


class RttProxy:
    """The proxy in a process of its own, for a `with` block: connect to `port` (or `url(...)`)."""

    def __init__(self, target_port: int, delay_ms: float = 0.0, target_host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.target_host = target_host
        self.delay_ms = delay_ms
        self.port = 0
        self.process: Process | None = None
        self._logs: tempfile.TemporaryDirectory | None = None

    @classmethod
    def with_rtt(cls, target_port: int, rtt_ms: float, target_host: str = "127.0.0.1") -> RttProxy:
        """A proxy whose round trip costs `rtt_ms` (half of it each way)."""
        return cls(target_port, delay_ms=rtt_ms / 2, target_host=target_host)

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_ms

    def url(self, redis_url: str) -> str:
        """`redis_url` (which names the target) with the proxy's address in its place."""
        parts = urlsplit(redis_url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def start(self) -> RttProxy:
        self._logs = tempfile.TemporaryDirectory(prefix="afterward-rtt-proxy-")
        self._control = Path(self._logs.name) / "delay-ms"
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        for attempt in range(3):
            self.port = free_port()
            command = (
                f"{sys.executable} -m bench.rtt_proxy --delay-ms {self.delay_ms} --port {self.port} "
                f"--target-host {self.target_host} --control {self._control} {self.target_port}"
            )
            self.process = Process("rtt-proxy", command, env, Path(self._logs.name) / f"{self.port}.log")
            try:
                wait_until(self._listening, timeout=30, what="the RTT proxy", process=self.process)
                return self
            except AssertionError:
                self.process.kill()
                if attempt == 2 or "in use" not in self.process.output():
                    raise
        raise AssertionError("unreachable")

    def set_delay(self, delay_ms: float) -> None:
        """Change the running proxy's one-way delay; bytes already held keep theirs."""
        assert self.process is not None, "the proxy is not running"
        self._control.write_text(repr(delay_ms))
        told = f"delay now {delay_ms!r} ms"
        seen = self.process.output().count(told)
        self.process.signal(signal.SIGUSR1)
        wait_until(lambda: self.process.output().count(told) > seen, timeout=30, what="the new delay")
        self.delay_ms = delay_ms

    def set_rtt(self, rtt_ms: float) -> None:
        self.set_delay(rtt_ms / 2)

    def _listening(self) -> bool:
        return self.process is not None and f"127.0.0.1:{self.port} ->" in self.process.output()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None
        if self._logs is not None:
            self._logs.cleanup()
            self._logs = None

    def __enter__(self) -> RttProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("target_port", type=int, metavar="TARGET_PORT", help="the Redis port to forward to")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="one-way delay in milliseconds (round trip: twice it)"
    )
    parser.add_argument("--port", type=int, default=0, help="the port to listen on (default: a free one)")
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument(
        "--control", type=Path, help="on SIGUSR1, take the one-way delay in ms written in this file"
    )
    args = parser.parse_args()
    run(args.target_port, args.delay_ms, args.port or free_port(), args.target_host, args.control)


if __name__ == "__main__":
    main()
