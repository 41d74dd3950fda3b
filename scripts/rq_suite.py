"""Run tests of RQ's own suite against stock RQ, then with the engine's classes in RQ's place.

    .venv/bin/python scripts/rq_suite.py                 # the dependency tests named below
    .venv/bin/python scripts/rq_suite.py tests/test_dependencies.py   # any of RQ's tests

RQ ships its tests in its sdist. This downloads the sdist of the installed RQ (pip, into a
temporary folder), unpacks its tests, and runs them twice on a private redis-server:

- `stock`: RQ as it is (every named test must pass);
- `ours`: the `Queue`, `Worker` and `Job` RQ's test modules import are jobs.engine's (and
  `SimpleWorker` is RQ's, taking our queues and jobs: the engine has no in-process worker);
  RQ's own modules keep theirs. RQ's test fixtures are registered as job types (EXTRA_JOB_MODULES), so the
  engine's allow-list is not what a test trips on.

RQ's tests connect to `Redis()` (localhost:6379): here every default connection goes to the
private server instead, and the server dies with the run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.embedded_redis import EmbeddedRedis  # noqa: E402

# RQ's tests of job dependencies that exercise the worker, queue and job classes together.
DEPENDENCY_TESTS = (
    "tests/test_dependencies.py::TestDependencies::test_allow_failure_when_dependency_has_already_failed",
    "tests/test_dependencies.py::TestDependencies::test_dependencies_are_met_if_dependency_is_deleted",
    "tests/test_dependencies.py::TestDependencies::test_enqueue_many_at_front_with_met_dependencies",
    "tests/test_worker.py::TestWorker::test_cancel_running_parent_job",
    "tests/test_worker.py::TestWorker::test_job_dependency_race_condition",
    "tests/test_job_dependency.py::TestJobDependency::test_cancel_post_commit_drain_failure_leaves_consistent_state",
)

# Loaded by pytest before RQ's test modules import `from rq import Queue, Worker`.
CONFTEST = '''
import inspect
import os

import redis
import rq
import rq.job
import tests

PORT = int(os.environ["RQ_SUITE_REDIS_PORT"])

# Every Redis() without a port (RQ's tests, its fixtures' subprocesses) reaches the private server.
_init = inspect.unwrap(redis.Redis.__init__)
_defaults = list(_init.__defaults__)
_defaults[_defaults.index(6379)] = PORT
_init.__defaults__ = tuple(_defaults)


def _private_database(ssl=False):
    connection = redis.Redis(port=PORT, db=4)
    connection.flushdb()
    return connection


tests.find_empty_redis_database = _private_database

if os.environ["RQ_SUITE_MODE"] == "ours":
    import sys

    from rq.serializers import JSONSerializer

    from jobs.engine.job import Job
    from jobs.engine.queue import Queue
    from jobs.engine.worker import Worker

    class SimpleWorker(rq.SimpleWorker):
        """RQ's in-process worker, on the engine's queues and jobs."""

        queue_class = Queue
        job_class = Job

        def __init__(self, *args, **kwargs):
            kwargs.update(queue_class=Queue, job_class=Job, serializer=JSONSerializer)
            super().__init__(*args, **kwargs)

    OURS = {"Queue": Queue, "Worker": Worker, "SimpleWorker": SimpleWorker, "Job": Job}
    STOCK = {"Queue": rq.Queue, "Worker": rq.Worker, "SimpleWorker": rq.SimpleWorker, "Job": rq.job.Job}

    def pytest_collection_modifyitems(session, config, items):
        # The names RQ's test modules imported, not RQ's own: RQ's modules keep their classes.
        for name, module in list(sys.modules.items()):
            if name == "tests" or name.startswith("tests."):
                for attribute, stock in STOCK.items():
                    if getattr(module, attribute, None) is stock:
                        setattr(module, attribute, OURS[attribute])
'''


# RQ's test fixtures as job types (EXTRA_JOB_MODULES): the engine runs registered functions only.
FIXTURE_TYPES = """
import inspect

import tests.fixtures as fixtures
from jobs.types.registry import JobType
from jobs.types.schema import JobInput

JOB_TYPES = {
    f"rq_{name}": JobType(function, JobInput)
    for name, function in vars(fixtures).items()
    if inspect.isfunction(function) and function.__module__ == fixtures.__name__
}
"""


PIP_DOWNLOAD = (sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check")
PIP_DOWNLOAD += ("--no-binary", ":all:", "--no-deps")


def fetch_tests(into: Path) -> Path:
    """RQ's sdist for the installed version, unpacked under `into`; its root."""
    release = version("rq")
    subprocess.run(
        [*PIP_DOWNLOAD, f"rq=={release}", "-d", str(into)],
        check=True,
    )
    with tarfile.open(next(into.glob("rq-*.tar.gz"))) as archive:
        archive.extractall(into, filter="data")
    root = into / f"rq-{release}"
    # The installed RQ (the one the engine runs on) is the one tested, not the sdist's copy.
    subprocess.run(["rm", "-rf", str(root / "rq")], check=True)
    (root / "conftest.py").write_text(CONFTEST)
    (root / "rq_suite_types.py").write_text(FIXTURE_TYPES)
    return root


def run(root: Path, mode: str, port: int, tests: list[str]) -> int:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{root}:{ROOT}",
        "RQ_SUITE_MODE": mode,
        "RQ_SUITE_REDIS_PORT": str(port),
        "REDIS_URL": f"redis://127.0.0.1:{port}/4",
        "EXTRA_JOB_MODULES": "rq_suite_types",
    }
    print(f"\n=== {mode}: {'RQ as shipped' if mode == 'stock' else 'the engine in RQ s place'}", flush=True)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", "--no-header", *tests]
    return subprocess.run(command, cwd=root, env=env).returncode


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tests", nargs="*", help="RQ test ids (default: the dependency tests)")
    parser.add_argument("--mode", choices=("stock", "ours", "both"), default="both")
    args = parser.parse_args()
    tests = args.tests or list(DEPENDENCY_TESTS)
    with tempfile.TemporaryDirectory(prefix="rq-suite-") as folder:
        root = fetch_tests(Path(folder))
        with EmbeddedRedis(Path(folder) / "redis", appendonly=False) as server:
            modes = ("stock", "ours") if args.mode == "both" else (args.mode,)
            codes = {mode: run(root, mode, server.port, tests) for mode in modes}
    outcome = (f"{mode}: {'passed' if code == 0 else 'failures'}" for mode, code in codes.items())
    print("\n" + ", ".join(outcome))
    return max(codes.values())


if __name__ == "__main__":
    sys.exit(main())
