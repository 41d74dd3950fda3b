"""Scale-out: Redis, web, workers and embedder as separate hosts that share only REDIS_URL.

Each "host" is a directory with its own copy of the code and its own files (job log, Redis
data); processes run there, from there. Nothing passes between them but Redis. Submitted
jobs must run on the worker hosts, documents embedded on the embedder host must be found by
the web host's search, and a second worker host must raise throughput.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from scripts.embedded_redis import EmbeddedRedis
from service.workers import live_workers
from tests.support import DEADLINE, ROOT, Process, WebService, base_env, procfile_command, wait_until

pytestmark = pytest.mark.integration

SHIPPED = ["service", "webserver", "jobs", "scripts", "tests", "Procfile", "gunicorn.conf.py"]


class Host:
    """A directory standing for a machine: a copy of the code, files of its own."""

    def __init__(self, root: Path, name: str, redis_url: str) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        for item in SHIPPED:
            source = ROOT / item
            if source.is_dir():
                shutil.copytree(source, self.dir / item, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, self.dir / item)
        self.env = base_env(redis_url, self.dir, SEARCH_WARMUP=1, PYTHONPATH=str(self.dir))
        self.processes: list[Process] = []

    def run(self, kind: str, **extra: str) -> Process:
        env = dict(self.env, **extra)
        process = Process(
            f"{self.name}-{kind}", procfile_command(kind), env, self.dir / f"{kind}.log", cwd=self.dir
        )
        self.processes.append(process)
        return process

    def serve(self) -> WebService:
        web = WebService(self.env, self.dir, name=f"{self.name}-web", cwd=self.dir)
        self.processes.append(web.process)
        return web

    @property
    def job_log(self) -> Path:
        return self.dir / "jobs.log"

    def stop(self) -> None:
        for process in self.processes:
            process.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, Host]]]:
    server = EmbeddedRedis(tmp_path / "redis-host").start()
    hosts: dict[str, Host] = {}
    try:
        for name in ("web", "worker-1", "worker-2", "embedder"):
            hosts[name] = Host(tmp_path, name, server.url)
        yield server.url, hosts
    finally:
        for host in hosts.values():
            host.stop()
        server.stop()


def test_hosts_sharing_only_redis(cluster):
    redis_url, hosts = cluster
    connection = redis.Redis.from_url(redis_url)
    base = hosts["web"].serve().base
    hosts["worker-1"].run("worker", WORKERS="1")
    hosts["embedder"].run("embedder", EMBED_WORKERS="1")
    wait_until(lambda: len(live_workers(connection)) >= 2, what="workers on two hosts")

    # A job submitted to the web host runs on the worker host.
    marker = uuid.uuid4().hex
    job = requests.post(f"{base}/jobs/log", json={"message": marker}, timeout=10).json()
    assert _wait(base, job["id"])["status"] == "finished"
    assert marker in hosts["worker-1"].job_log.read_text()
    assert not hosts["web"].job_log.exists() and not hosts["embedder"].job_log.exists()

    # Documents embedded on the embedder host are found by the web host's search.
    docs = [
        {"id": "whale", "text": "The blue whale is the largest animal that ever lived."},
        {"id": "compiler", "text": "The compiler turns source code into machine instructions."},
    ]
    embed = requests.post(f"{base}/jobs/embed", json={"documents": docs}, timeout=10).json()
    assert _wait(base, embed["id"])["status"] == "finished"
    found = requests.get(f"{base}/search", params={"q": "an enormous sea mammal", "k": 1}, timeout=60).json()
    assert found["results"][0]["id"] == "whale"

    # A second worker host raises throughput (jobs that wait, not compute: 2 cores suffice).
    one_host = _drain(base, count=24, seconds=0.25)
    hosts["worker-2"].run("worker", WORKERS="1")
    wait_until(lambda: len(live_workers(connection)) >= 3, what="the second worker host")
    two_hosts = _drain(base, count=24, seconds=0.25)
    print(f"\n24 jobs of 0.25 s: {one_host:.1f} jobs/s on one worker host, {two_hosts:.1f} on two")
    assert two_hosts > 1.5 * one_host
    assert "jobs.types.sleep.sleep_for" in (hosts["worker-2"].dir / "worker.log").read_text()


def _drain(base: str, count: int, seconds: float) -> float:
    started = time.monotonic()
    ids = [
        requests.post(f"{base}/jobs/sleep", json={"seconds": seconds}, timeout=10).json()["id"]
        for _ in range(count)
    ]
    for job_id in ids:
        assert _wait(base, job_id)["status"] == "finished"
    return count / (time.monotonic() - started)


def _wait(base: str, job_id: str, timeout: float = DEADLINE) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = requests.get(f"{base}/jobs/{job_id}", params={"wait": 10}, timeout=30).json()
        if view["status"] in ("finished", "failed", "canceled", "stopped") or time.monotonic() > deadline:
            return view
