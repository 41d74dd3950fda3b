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


# onnxruntime starts its telemetry thread, the one a forked process trips over at exit, only
# where none of these says it runs in CI: the runners here run as on a developer's machine.
ORT_CI_VARIABLES = (
    "CI",
    "TF_BUILD",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "CODEBUILD_BUILD_ID",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "APPVEYOR",
    "BITBUCKET_BUILD_NUMBER",
    "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI",
)


def start_runner(
    runner: str, url: str, tmp_path, processes: str = "web worker", **settings: object
) -> tuple[Process, str]:
    """`make run` (all its processes) or honcho (`processes`), serving on a free port."""
    port = free_port()
    settings = {"SEARCH_WARMUP": 0, **settings}
    env = base_env(url, tmp_path, HOST="127.0.0.1", PORT=port, WORKERS=1, **settings)
    for name in ORT_CI_VARIABLES:
        env.pop(name, None)
    if runner == "honcho":
        env["SHUTDOWN_GRACE"] = str(GRACE)
        command = f"honcho start --procfile Procfile --port {port} {processes}"
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


# What a process that crashed on its way out leaves in the output: a C++ exception escaping
# (std::terminate), an abort (gunicorn names the signal; a shell prints "Aborted"), a Python error.
CRASH_SIGNS = ("terminate called", "SIGABRT", "Aborted", "core dumped", "Traceback")
# The runner's exit status after a stop: make run's own, else honcho's for the signal it got.
CLEAN_EXIT = {"make run": 0, "honcho": 128 + signal.SIGTERM}


def maps_onnxruntime(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return "onnxruntime" in maps.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("runner", "stop"), [("make run", "Ctrl-C"), ("honcho", "SIGTERM")])
def test_a_stop_with_the_model_loaded_before_the_fork_is_clean(runner, stop, private_redis, tmp_path):
    # SEARCH_WARMUP=1, make run's default: the web process loads the ONNX model before it
    # forks its workers (gunicorn.conf.py, when_ready), and they exit with its session.
    settings = {"SEARCH_WARMUP": 1, "EMBED_BACKEND": "onnx", "EMBED_THREADS": 1}
    process, base = start_runner(runner, private_redis.url, tmp_path, "web worker embedder", **settings)
    try:
        wait_until(
            lambda: requests.get(base + "/readyz", timeout=10).status_code == 200,
            what="the web processes to load the model",
            process=process,
        )
        masters = [p for p in ownership.tagged(process.tag) if p.name() == "gunicorn" and p.children()]
        assert [maps_onnxruntime(master.pid) for master in masters] == [True], "loaded before the fork"

        # The model at work in the embedder's work-horse, then in a forked web process.
        job = requests.post(base + "/jobs/embed", json={"text": "a clean stop"}, timeout=30).json()
        wait_until(
            lambda: requests.get(f"{base}/jobs/{job['id']}", timeout=10).json()["status"] == "finished",
            what="the embed job",
            process=process,
        )
        found = requests.get(base + "/search", params={"q": "stopping cleanly"}, timeout=30).json()
        assert job["document_ids"][0] in [hit["id"] for hit in found["results"]]

        if stop == "Ctrl-C":
            os.killpg(process.pid, signal.SIGINT)  # in the runner's terminal
        else:
            process.popen.send_signal(signal.SIGTERM)  # to the runner alone, as a platform does
        code = process.popen.wait(timeout=GRACE + 30)
        output = process.output()
        assert ownership.tagged(process.tag) == [], "a process outlived the runner"
        for sign in CRASH_SIGNS:
            assert sign not in output, output[-4000:]
        assert "sending SIGKILL" not in output, "the runner had to kill what did not stop"
        assert code == CLEAN_EXIT[runner]
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
