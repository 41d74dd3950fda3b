"""Fixtures: fakeredis apps for unit tests; a real Redis and real processes for integration tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis

import service.state
from jobs.settings import get_settings
from service import create_app
from tests import ownership
from tests.support import ROOT, Process, TestDatabase, WebService, base_env, scratch_database, start_workers

# Nothing listens on port 1: code that forgets its test Redis reaches no one's server, even
# when the developer's shell sets REDIS_URL. Tests choose a Redis explicitly (`scratch_database`).
NO_REDIS = "redis://127.0.0.1:1/0"
# The index file directory this process made for the run, removed when it ends.
INDEX_DIR = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    os.environ["REDIS_URL"] = NO_REDIS
    # Index snapshot files of the run's processes, away from the checkout's var/.
    if "INDEX_DIR" not in os.environ:
        os.environ["INDEX_DIR"] = config.stash[INDEX_DIR] = tempfile.mkdtemp(prefix="afterward-index-")
    ownership.begin(ROOT)
    ownership.install_signal_handlers()


def pytest_unconfigure(config: pytest.Config) -> None:
    if INDEX_DIR in config.stash:
        shutil.rmtree(config.stash[INDEX_DIR], ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every fixture is torn down: nothing the run started may still be alive."""
    left = ownership.leftovers(grace=3)
    ownership.reap_orphans()
    if not left:
        return
    names = "\n  ".join(ownership.describe(process) for process in left)
    ownership.kill(left)
    print(f"\n\nFAILED: {len(left)} process(es) outlived their tests (now killed):\n  {names}", flush=True)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    item.stash[first_process] = len(Process.started)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    """A failed test's report ends with the last lines of each process it used.

    Those are the processes it started, and those started before it (the session's web
    process) that are still running.
    """
    report = yield
    if report.failed:
        first = item.stash.get(first_process, 0)
        earlier = [process for process in Process.started[:first] if process.alive()]
        for process in earlier + Process.started[first:]:
            with contextlib.suppress(OSError):
                tail = "\n".join(process.output().splitlines()[-40:])
                report.sections.append((f"{process.name} log ({process.log_path})", tail))
    return report


first_process = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """Settings are read from the environment once per process: again for each test."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def no_leaked_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """A unit test must not leave threads running in pytest (a model loading in the background).

    Integration tests are exempt: their module-scoped fixtures (the browser) keep threads.
    """
    if request.node.get_closest_marker("integration"):
        yield
        return
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


# ---------------------------------------------------------------- unit tests (fakeredis)


@pytest.fixture
def fake_redis(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeRedis:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    monkeypatch.setattr(service.state, "connect_redis", lambda settings: client)
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
def test_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestDatabase]:
    """TEST_REDIS_URL's server if set, else a private redis-server for the session."""
    with scratch_database(tmp_path_factory.mktemp("redis")) as database:
        yield database


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
    # Web processes load the model on their first search, not at start: most tests never search.
    return base_env(
        test_db.url,
        tmp_path_factory.mktemp("session"),
        JOB_MONITORING_INTERVAL=1,
        TIMEOUT_GRACE=2,
        SEARCH_WARMUP=0,
        # Completion webhooks reach the tests' receivers on 127.0.0.1 (tests/test_webhooks.py).
        CALLBACK_SECRET="test-callback-secret",
        CALLBACK_ALLOWED_HOSTS="127.0.0.1",
    )


@pytest.fixture(scope="session")
def web(session_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebService]:
    """The Procfile's web process, shared by the integration tests (it keeps no state).

    Long polls re-read their job only once a minute here, so they depend on the end events
    (tests/test_integration.py checks that they wake on them).
    """
    # DASHBOARD_OPEN: tests act as an operator on this machine would (requeue from /rq/).
    # RATE_LIMIT off: every test of a test process calls it from one address, whose budget
    # would be theirs together (rate limits are tested on web processes of their own).
    env = dict(session_env, WEB_CONCURRENCY="2", LONG_POLL_RECHECK="60", DASHBOARD_OPEN="1", RATE_LIMIT="off")
    service = WebService(env, tmp_path_factory.mktemp("web"))
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
