"""What the benchmarks share: a private Redis database, the Procfile's processes, a load generator."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import requests

from scripts.processes import Process, wait_until
from scripts.stack import TestDatabase, WebService, procfile_env, scratch_database, start_workers

PRIVATE = "private"


def bench_parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the `--redis` option every benchmark takes."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("TEST_REDIS_URL") or PRIVATE,
        help="a Redis server to use (a free database on it is taken, marked and flushed); "
        "default: TEST_REDIS_URL, else a private redis-server started for the run",
    )
    return parser


@contextmanager
def database(redis: str = PRIVATE) -> Iterator[TestDatabase]:
    """A database of our own on the server `redis` names, or on a private server."""
    with scratch_database(url="" if redis == PRIVATE else redis) as db:
        version = db.client().info("server")["redis_version"]
        where = "a private redis-server" if redis == PRIVATE else f"database {db.db} of {db.base_url}"
        print(f"Redis {version}: {where}", flush=True)
        yield db


def env_for(db: TestDatabase, tmp: Path, **extra: object) -> dict[str, str]:
    return procfile_env(db.url, tmp, SEARCH_WARMUP=0, **extra)


@contextmanager
def service(env: dict[str, str], tmp: Path, workers: int = 2, kind: str = "worker") -> Iterator[WebService]:
    """The Procfile's web process and a worker process with `workers` workers."""
    web = WebService(env, tmp)
    pool: Process | None = start_workers(env, tmp, count=workers, kind=kind) if workers else None
    try:
        if pool is not None:
            client = redis.Redis.from_url(env["REDIS_URL"])
            wait_until(
                lambda: client.scard("rq:workers") >= workers, timeout=180, what="workers", process=pool
            )
        yield web
    finally:
        if pool is not None:
            pool.kill()
        web.process.kill()


def run_clients(clients: int, total: int, call: Callable[[requests.Session, int], None]) -> list[float]:
    """`total` calls spread over `clients` threads; returns each call's latency in seconds."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))

    failures: list[BaseException] = []

    def client() -> None:
        session = requests.Session()
        mine = []
        try:
            while not failures:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                started = time.perf_counter()
                call(session, i)
                mine.append(time.perf_counter() - started)
        except BaseException as error:  # a failed call fails the benchmark, not just its thread
            failures.append(error)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return latencies


class ClientKeys:
    """An API key for each client thread, as separate client applications would have."""

    def __init__(self, clients: int) -> None:
        self.keys = [secrets.token_hex(16) for _ in range(clients)]
        self._of_session: dict[int, str] = {}
        self._lock = threading.Lock()

    @property
    def setting(self) -> str:
        """The API_KEYS setting that admits them all."""
        return ",".join(self.keys)

    def headers(self, session: requests.Session) -> dict[str, str]:
        """The Authorization header of the client thread that owns `session`."""
        with self._lock:
            if id(session) not in self._of_session:
                self._of_session[id(session)] = self.keys[len(self._of_session) % len(self.keys)]
            return {"Authorization": f"Bearer {self._of_session[id(session)]}"}


def wait_finished(connection: redis.Redis, ids: list[str], timeout: float = 600) -> None:
    def done() -> bool:
        with connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(f"rq:job:{job_id}", "status")
            statuses = pipe.execute()
        for job_id, status in zip(ids, statuses, strict=True):
            if status in (b"failed", b"stopped", b"canceled"):
                meta = connection.hget(f"rq:job:{job_id}", "meta")
                raise AssertionError(f"job {job_id} ended {status.decode()}: {meta!r}")
        return all(status == b"finished" for status in statuses)

    wait_until(done, timeout=timeout, what=f"{len(ids)} jobs to finish")


def percentile(samples: list[float], q: float) -> float | None:
    """The q-quantile, or None when fewer than 10 samples lie beyond it (p99 needs 1,000)."""
    if len(samples) * (1 - q) < 10 and q > 0.5:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float | None) -> str:
    """Seconds as milliseconds for a table; `n/a` for a percentile the samples cannot support."""
    return "n/a" if value is None else f"{value * 1000:.1f} ms"


def result(name: str, **figures: object) -> None:
    """One machine-readable line per measured row, which bench.report gathers into BENCHMARKS.md."""
    print("RESULT " + json.dumps({"benchmark": name, **figures}), flush=True)


def median(samples: list[float]) -> float:
    return statistics.median(samples)
