"""The Procfile's processes on this machine, against a Redis database of our own.

Tests and benchmarks start the very commands a deploy runs (`procfile_command`), with a web
process that is only counted as up once it answers from a socket of its own, and a Redis
database they may flush: on a server they started, or one TEST_REDIS_URL names.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

from scripts.embedded_redis import EmbeddedRedis, free_port
from scripts.processes import DEADLINE, ROOT, Process, wait_until

# Marks a database as belonging to a test or benchmark run, so it may be flushed.
OWNED_MARKER = "afterward-test:owned"
LOCK_KEY = "afterward-test:lock"


@contextmanager
def scratch_database(directory: Path | None = None, url: str | None = None) -> Iterator[TestDatabase]:
    """A Redis database we may flush: on the server `url` (else TEST_REDIS_URL) names, or a private one.

    With neither, a redis-server of our own starts on a free port, with its files under
    `directory`, and stops afterwards: tests and benchmarks never touch a server they did
    not start unless they are told its address.
    """
    named = os.environ.get("TEST_REDIS_URL") if url is None else url
    if named:
        database = TestDatabase(named).acquire()
        try:
            yield database
        finally:
            database.release()
        return
    with (
        tempfile.TemporaryDirectory(prefix="afterward-redis-") as scratch,
        EmbeddedRedis(directory or scratch, appendonly=False) as server,
    ):
        yield TestDatabase(server.base_url).acquire()


def procfile_command(name: str) -> str:
    """The command of process type `name` in the Procfile: tests run exactly what deploys run."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise KeyError(f"no {name!r} process in the Procfile")


class TestDatabase:
    """A Redis database number reserved for one test run, flushed around each test."""

    def __init__(self, url: str) -> None:
        # A URL naming a database names the server: a free database is taken on it.
        scheme, rest = url.split("://", 1)
        self.base_url = f"{scheme}://{rest.split('/', 1)[0]}"
        self.token = uuid.uuid4().hex
        self.db: int | None = None

    def acquire(self) -> TestDatabase:
        # From 15 down: a database is taken when it is empty or already marked as ours,
        # and nobody else holds its lock (two test runs may share one Redis server).
        for db in range(15, 0, -1):
            client = redis.Redis.from_url(f"{self.base_url}/{db}")
            if not client.set(LOCK_KEY, self.token, nx=True, ex=3 * 3600):
                continue
            if client.dbsize() == 1 or client.exists(OWNED_MARKER):
                self.db = db
                self.flush()
                return self
            client.delete(LOCK_KEY)
        raise RuntimeError("no free Redis database for the tests (15..1 are all in use)")

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.db}"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def flush(self) -> None:
        client = self.client()
        client.flushdb()
        client.set(LOCK_KEY, self.token, ex=3 * 3600)
        client.set(OWNED_MARKER, "1")

    def release(self) -> None:
        client = self.client()
        client.flushdb()
        client.set(OWNED_MARKER, "1")


def procfile_env(redis_url: str, tmp: Path, **extra: Any) -> dict[str, str]:
    """The environment of a Procfile process: this one's, on `redis_url`, logging under `tmp`.

    Settings of ours inherited from the caller's environment (REDIS_*, WEB_*, LONG_POLL_*)
    are dropped; `extra` sets others (`WORKERS=1`), upper-cased.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WEB_", "LONG_POLL"))}
    env.update(
        REDIS_URL=redis_url,
        LOG_FILE=str(tmp / "jobs.log"),
        PYTHONUNBUFFERED="1",
        PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}" if (ROOT / ".venv").exists() else env["PATH"],
        PYTHONPATH=str(ROOT),
    )
    env.update({k.upper(): str(v) for k, v in extra.items()})
    return env


class WebService:
    """The Procfile's web process on a free loopback port."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "web", cwd: Path = ROOT) -> None:
        for attempt in range(3):
            self.port = free_port()
            self.base = f"http://127.0.0.1:{self.port}"
            self.process = Process(
                name,
                procfile_command("web"),
                dict(env, HOST="127.0.0.1", PORT=str(self.port)),
                log_dir / f"{name}-{self.port}.log",
                cwd=cwd,
            )
            try:
                wait_until(
                    lambda: serves(self.process, self.port, self.base + "/healthz"),
                    what=f"{name} process to answer /healthz",
                    process=self.process,
                )
                break
            except AssertionError:
                self.process.kill()
                # Another program took the port between our check and gunicorn's bind.
                if attempt == 2 or "in use" not in self.process.output():
                    raise
        self.http = requests.Session()

    def url(self, path: str) -> str:
        return self.base + path

    def post_job(self, type_name: str, body: dict, **kwargs: Any) -> requests.Response:
        return self.http.post(self.url(f"/jobs/{type_name}"), json=body, timeout=30, **kwargs)

    def job(self, job_id: str, wait: float = 0) -> dict:
        params = {"wait": wait} if wait else None
        response = self.http.get(self.url(f"/jobs/{job_id}"), params=params, timeout=wait + 30)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for_status(self, job_id: str, statuses: set[str], timeout: float = DEADLINE) -> dict:
        """Poll until the job is in one of `statuses`; long-polls when they are all end states."""
        long_poll = statuses <= {"finished", "failed", "canceled", "stopped"}
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            view = self.job(job_id, wait=min(5, max(0.1, remaining)) if long_poll else 0)
            if view["status"] in statuses:
                return view
            if remaining <= 0:
                raise AssertionError(f"job {job_id} is {view['status']}, not {statuses}: {view}")
            if not long_poll:
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()


def serves(process: Process, port: int, url: str) -> bool:
    """True once `url` answers 200 from a socket that `process` (or a child of it) listens on.

    Any failure to connect or read means "not yet". Checking who listens keeps a test
    from talking to another program that took the port (another test run's server).
    """
    try:
        if requests.get(url, timeout=5).status_code != 200:
            return False
        root = psutil.Process(process.pid)
        for candidate in [root, *root.children(recursive=True)]:
            with suppress(psutil.Error):
                for s in candidate.net_connections(kind="tcp"):
                    if s.status == psutil.CONN_LISTEN and s.laddr.port == port:
                        return True
    except (requests.RequestException, psutil.Error):
        return False
    return False


def start_workers(env: dict[str, str], log_dir: Path, count: int = 1, kind: str = "worker") -> Process:
    """The Procfile's `worker` or `embedder` process (an `rq worker-pool`) with `count` workers."""
    env = dict(env, **{"EMBED_WORKERS" if kind == "embedder" else "WORKERS": str(count)})
    return Process(kind, procfile_command(kind), env, log_dir / f"{kind}-{uuid.uuid4().hex[:8]}.log")
