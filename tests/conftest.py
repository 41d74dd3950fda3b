"""Fixtures: fakeredis apps for unit tests; a real Redis and real processes for integration tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis

import service.state
from scripts.embedded_redis import EmbeddedRedis, answers
from service import create_app
from tests.support import Process, TestDatabase, WebService, base_env, start_workers

# ---------------------------------------------------------------- unit tests (fakeredis)


@pytest.fixture
def fake_redis(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeRedis:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    monkeypatch.setattr(service.state, "connect_redis", lambda url: client)
    return client


@pytest.fixture
def app(fake_redis: fakeredis.FakeRedis, tmp_path: Path):
    return create_app(
        {"extra_job_modules": ("tests.fixtures",), "log_file": str(tmp_path / "jobs.log"), "search_warmup": 0}
    )


@pytest.fixture
def client(app):
    return app.test_client()


# ---------------------------------------------------------------- integration tests (real Redis)


@pytest.fixture(scope="session")
def redis_base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A reachable Redis server: TEST_REDIS_URL, REDIS_URL, localhost:6379, or an embedded one."""
    for candidate in (
        os.environ.get("TEST_REDIS_URL"),
        os.environ.get("REDIS_URL"),
        "redis://127.0.0.1:6379",
    ):
        if candidate and answers(candidate):
            yield candidate.rsplit("/", 1)[0] if candidate.count("/") > 2 else candidate
            return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False) as server:
        yield server.url.rsplit("/", 1)[0]


@pytest.fixture(scope="session")
def test_db(redis_base_url: str) -> Iterator[TestDatabase]:
    database = TestDatabase(redis_base_url).acquire()
    yield database
    database.release()


@pytest.fixture
def real_redis(test_db: TestDatabase) -> Iterator[redis.Redis]:
    """A client on the test database, flushed before and after the test."""
    test_db.flush()
    client = test_db.client()
    yield client
    test_db.flush()
    client.close()


@pytest.fixture(scope="session")
def session_env(test_db: TestDatabase, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return base_env(
        test_db.url, tmp_path_factory.mktemp("session"), JOB_MONITORING_INTERVAL=1, TIMEOUT_GRACE=2
    )


@pytest.fixture(scope="session")
def web(session_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebService]:
    """The Procfile's web process, shared by the integration tests (it keeps no state)."""
    service = WebService(dict(session_env, WEB_CONCURRENCY="2"), tmp_path_factory.mktemp("web"))
    yield service
    service.stop()


@pytest.fixture
def proc_dir(tmp_path: Path) -> Path:
    """Where this test's processes write their logs and the job log."""
    return tmp_path


@pytest.fixture
def env(session_env: dict[str, str], real_redis: redis.Redis, proc_dir: Path) -> dict[str, str]:
    return dict(session_env, LOG_FILE=str(proc_dir / "jobs.log"))


@pytest.fixture
def workers(env: dict[str, str], proc_dir: Path) -> Iterator[Callable[..., Process]]:
    """Start the Procfile's worker process: `workers(count=2)`; all are killed after the test."""
    started: list[Process] = []

    def start(count: int = 1, **extra: str) -> Process:
        process = start_workers(dict(env, **extra), proc_dir, count=count)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
