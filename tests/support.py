"""Helpers for integration tests: a test Redis database and the Procfile's processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import redis
import requests

from scripts.embedded_redis import free_port

ROOT = Path(__file__).resolve().parent.parent

# Marks a database as belonging to this test suite, so it may be flushed.
OWNED_MARKER = "afterward-test:owned"
LOCK_KEY = "afterward-test:lock"


def procfile_command(name: str) -> str:
    """The command of process type `name` in the Procfile: tests run exactly what deploys run."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise KeyError(f"no {name!r} process in the Procfile")


class TestDatabase:
    """A Redis database number reserved for one test run, flushed around each test."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
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


class Process:
    """A Procfile process started in its own process group, stopped with its children."""

    def __init__(
        self, name: str, command: str, env: dict[str, str], log_path: Path, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()
        # Work-horses and pool children share the group: make sure none outlives the test.
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the whole group at once: for clean-up, where a graceful stop only costs time."""
        self.signal(signal.SIGKILL)
        self.popen.wait()
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def base_env(redis_url: str, tmp: Path, **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WEB_", "LONG_POLL"))}
    env.update(
        REDIS_URL=redis_url,
        LOG_FILE=str(tmp / "jobs.log"),
        PYTHONUNBUFFERED="1",
        PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}" if (ROOT / ".venv").exists() else env["PATH"],
        # Test-only job types (tests/fixtures.py) and short waits so the suite stays fast.
        EXTRA_JOB_MODULES="tests.fixtures",
        RETRY_BACKOFF="1",
        PYTHONPATH=str(ROOT),
    )
    env.update({k.upper(): str(v) for k, v in extra.items()})
    return env


class WebService:
    """The Procfile's web process on a free loopback port."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.port = free_port()
        env = dict(env, HOST="127.0.0.1", PORT=str(self.port))
        self.process = Process("web", procfile_command("web"), env, log_dir / f"web-{self.port}.log")
        self.base = f"http://127.0.0.1:{self.port}"
        self.http = requests.Session()
        wait_until(self._healthy, timeout=30, what="web process to answer /healthz", process=self.process)

    def _healthy(self) -> bool:
        try:
            return requests.get(self.base + "/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def url(self, path: str) -> str:
        return self.base + path

    def post_job(self, type_name: str, body: dict, **kwargs: Any) -> requests.Response:
        return self.http.post(self.url(f"/jobs/{type_name}"), json=body, timeout=30, **kwargs)

    def job(self, job_id: str, wait: float = 0) -> dict:
        params = {"wait": wait} if wait else None
        response = self.http.get(self.url(f"/jobs/{job_id}"), params=params, timeout=wait + 30)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for_status(self, job_id: str, statuses: set[str], timeout: float = 30) -> dict:
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


def start_workers(env: dict[str, str], log_dir: Path, count: int = 1, kind: str = "worker") -> Process:
    """The Procfile's `worker` or `embedder` process (an `rq worker-pool`) with `count` workers."""
    env = dict(env, **{"EMBED_WORKERS" if kind == "embedder" else "WORKERS": str(count)})
    return Process(kind, procfile_command(kind), env, log_dir / f"{kind}-{uuid.uuid4().hex[:8]}.log")


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30, what: str = "condition", process: Process | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and not process.alive():
            raise AssertionError(
                f"{process.name} exited while waiting for {what}:\n{process.output()[-3000:]}"
            )
        time.sleep(0.05)
    tail = f"\n{process.name} output:\n{process.output()[-3000:]}" if process is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")


@contextmanager
def running(process: Process) -> Iterator[Process]:
    try:
        yield process
    finally:
        process.stop()
