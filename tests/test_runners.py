"""Stopping under the process managers the docs describe: honcho, `make run`, and a worker
that is killed outright. A running job is put back, nothing is left running, no ghost worker.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest
import redis
import requests
from rq import Queue as RQQueue
from rq.serializers import JSONSerializer

from scripts.embedded_redis import EmbeddedRedis, free_port
from tests import ownership
from tests.support import ROOT, Process, base_env, serves, start_workers, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]

GRACE = 2  # make run's default SHUTDOWN_GRACE; honcho kills every process 5 s after SIGTERM


@pytest.fixture
def private_redis(tmp_path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis", appendonly=False) as server:
        yield server


def start_runner(runner: str, url: str, tmp_path) -> tuple[Process, str]:
    port = free_port()
    env = base_env(url, tmp_path, HOST="127.0.0.1", PORT=port, WORKERS=1, SEARCH_WARMUP=0)
    if runner == "honcho":
        env["SHUTDOWN_GRACE"] = str(GRACE)
        command = f"honcho start --procfile Procfile --port {port} web worker"
    else:  # what `make run` runs once the virtualenv is installed; SHUTDOWN_GRACE left to it
        command = f"{sys.executable} scripts/run.py"
    process = Process(runner.replace(" ", "-"), command, env, tmp_path / "runner.log")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: serves(process, port, base + "/healthz"), what="the web process", process=process)
    return process, base


def rq_info(url: str) -> str:
    command = [str(ROOT / ".venv" / "bin" / "rq"), "info", "--only-workers", "--url", url]
    if not os.path.exists(command[0]):
        command[0] = "rq"
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.mark.parametrize("runner", ["honcho", "make run"])
def test_ctrl_c_puts_the_running_job_back_and_leaves_nothing(runner, private_redis, tmp_path):
    client = redis.Redis.from_url(private_redis.url)
    process, base = start_runner(runner, private_redis.url, tmp_path)
    try:
        workers = 2 if runner == "make run" else 1  # make run starts the embedder too
        wait_until(lambda: client.scard("rq:workers") >= workers, what="the workers", process=process)
        job = requests.post(base + "/jobs/sleep", json={"seconds": 90}, timeout=30).json()
        wait_until(
            lambda: requests.get(f"{base}/jobs/{job['id']}", timeout=10).json()["status"] == "started",
            what="the job to start",
        )
        stopped_at = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the runner's terminal
        process.popen.wait(timeout=GRACE + 30)
        took = time.monotonic() - stopped_at
        print(f"\n{runner}: exited {took:.1f} s after Ctrl-C")
        assert "sending SIGKILL" not in process.output(), "the runner had to kill what did not stop"
        assert took <= GRACE + 10, process.output()[-3000:]

        assert client.hget(f"rq:job:{job['id']}", "status") == b"queued", process.output()[-3000:]
        assert b"WorkerShutdown" in client.hget(f"rq:job:{job['id']}", "meta")
        assert ownership.tagged(process.tag) == [], "a process outlived the runner"
        assert client.scard("rq:workers") == 0
        for key in client.scan_iter("rq:worker:*"):
            assert client.ttl(key) != -1, f"{key!r} would stay forever"
        assert "0 workers" in rq_info(private_redis.url)
    finally:
        process.kill()


@contextmanager
def holding_worker(
    url: str, tmp_path, **settings: object
) -> Iterator[tuple[redis.Redis, Any, psutil.Process]]:
    """A worker process running a job that holds on for ten minutes: (client, job, its horse)."""
    pool = start_workers(base_env(url, tmp_path, **settings), tmp_path, count=1)
    client = redis.Redis.from_url(url)
    try:
        wait_until(lambda: client.scard("rq:workers") >= 1, what="the worker", process=pool)
        job = RQQueue("default", connection=client, serializer=JSONSerializer).enqueue(
            "tests.fixtures.hold", seconds=600
        )
        pid = wait_until(lambda: client.get(f"afterward-test:pid:{job.id}"), what="the job's pid")
        yield client, job, psutil.Process(int(pid))
    finally:
        pool.kill()


def test_no_work_horse_outlives_its_worker(private_redis, tmp_path):
    with holding_worker(private_redis.url, tmp_path, JOB_MONITORING_INTERVAL=1) as (_, _, horse):
        worker = psutil.Process(horse.ppid())
        assert os.getpgid(horse.pid) == os.getpgid(worker.pid), "where the runner's signals reach it"
        worker.kill()  # SIGKILL: no clean-up code runs in the worker
        psutil.wait_procs([horse], timeout=10)
        assert not horse.is_running() or horse.status() == psutil.STATUS_ZOMBIE


TGKILL = {"x86_64": 234, "aarch64": 131}


def signal_thread(pid: int, tid: int, signum: int) -> None:
    """Deliver a signal to one thread of another process (tgkill), as the kernel may on its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(TGKILL[platform.machine()], pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


@pytest.mark.skipif(
    platform.machine() not in TGKILL, reason="tgkill's number is known for x86_64 and aarch64"
)
def test_a_stop_signal_landing_on_any_worker_thread_starts_the_grace_at_once(private_redis, tmp_path):
    # The kernel hands a process-directed signal to any thread that does not block it; the
    # worker watching its horse must still notice at once, not at its next look (10 s here).
    settings = {"JOB_MONITORING_INTERVAL": 10, "SHUTDOWN_GRACE": 1}
    with holding_worker(private_redis.url, tmp_path, **settings) as (client, job, horse):
        worker = psutil.Process(horse.ppid())
        time.sleep(0.5)  # the worker is now waiting on its horse
        other = [thread.id for thread in worker.threads() if thread.id != worker.pid]
        assert other, "the worker runs a second thread (RQ's pub/sub listener)"
        signalled = time.monotonic()
        signal_thread(worker.pid, other[0], signal.SIGTERM)
        wait_until(lambda: client.hget(job.key, "status") == b"queued", timeout=30, what="the put-back")
        took = time.monotonic() - signalled
        print(f"\njob put back {took:.1f} s after a SIGTERM to the worker's second thread")
        assert took < 6, "the grace period began only at the worker's next look at its horse"
