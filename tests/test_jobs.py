"""Job functions, the job class and settings, without a worker."""

from __future__ import annotations

import json

import pytest
from rq.serializers import DefaultSerializer
from rq.timeouts import JobTimeoutException

from jobs.engine.errors import UnregisteredJobError, describe_exception
from jobs.engine.job import Job
from jobs.settings import Settings
from jobs.types import sleep as sleep_module
from jobs.types.log import write_log
from jobs.types.registry import JOB_TYPES, allowed_functions, job_types
from jobs.types.sleep import sleep_for


@pytest.fixture
def log_file(tmp_path, monkeypatch):
    path = tmp_path / "logs" / "jobs.log"
    monkeypatch.setenv("LOG_FILE", str(path))
    return path


@pytest.mark.parametrize(
    "message",
    [
        "plain",
        "two\nlines",
        'fake\n{"time": "x", "level": "error", "job_id": "forged", "message": "forged"}',
        "carriage\rreturn and \x00 nul and \x1b[31m escape",
        "unicode é ß 漢字 🎉 and separators \u2028 \u2029 \x85 \x1c",
        "x" * 10_000,
    ],
)
def test_write_log_appends_exactly_one_json_line(log_file, capsysbinary, message):
    write_log(message, level="warning")
    write_log("second")
    raw = log_file.read_bytes()
    lines = raw.split(b"\n")
    assert lines[-1] == b""
    assert len(lines) == 3
    assert len(raw.decode("utf-8").splitlines()) == 2  # no Unicode line break either
    record = json.loads(lines[0])
    assert record["message"] == message
    assert record["level"] == "warning"
    assert record["job_id"] is None  # not inside a worker
    assert record["time"].endswith("Z")
    assert capsysbinary.readouterr().out == raw  # the worker's stdout gets the same lines


def test_write_log_result_describes_the_line(log_file):
    result = write_log("héllo", level="error")
    assert result["level"] == "error"
    assert result["characters"] == 5


def test_sleep_reports_progress_at_least_once_a_second(monkeypatch):
    reports = []
    monkeypatch.setattr(sleep_module, "report_progress", lambda p, m="": reports.append(p))
    assert sleep_for(1.2) == {"slept": 1.2}
    assert reports[0] == 0 and reports[-1] == 100
    assert len(reports) >= 3
    assert reports == sorted(reports)


def test_job_is_json_even_when_asked_for_pickle(fake_redis):
    job = Job.create(
        "jobs.types.log.write_log",
        kwargs={"message": "x"},
        connection=fake_redis,
        serializer=DefaultSerializer,
    )
    job.save()
    data = fake_redis.hget(job.key, "data")
    import zlib

    assert json.loads(zlib.decompress(data))[0] == "jobs.types.log.write_log"


@pytest.mark.parametrize(
    "name", ["os.system", "subprocess.call", "builtins.eval", "jobs.types.log.encode_line"]
)
def test_job_refuses_unregistered_functions(fake_redis, name):
    job = Job.create(name, args=["echo pwned"], connection=fake_redis)
    with pytest.raises(UnregisteredJobError, match="not a registered job function"):
        job.func  # noqa: B018


def test_registered_functions_resolve(fake_redis):
    assert allowed_functions() == {job_type.path for job_type in JOB_TYPES.values()}
    job = Job.create("jobs.types.log.write_log", kwargs={"message": "x"}, connection=fake_redis)
    assert job.func is write_log


def test_no_job_type_takes_the_name_of_another_route(monkeypatch):
    import tests.fixtures

    monkeypatch.setitem(tests.fixtures.JOB_TYPES, "retry", JOB_TYPES["log"])
    job_types.cache_clear()
    try:
        with pytest.raises(ValueError, match="'retry' cannot name a job type"):
            job_types(("tests.fixtures",))
    finally:
        job_types.cache_clear()


def test_errors_are_described_without_tracebacks(fake_redis):
    job = Job.create("jobs.types.sleep.sleep_for", kwargs={"seconds": 5}, connection=fake_redis, timeout=5)
    assert describe_exception(
        job, JobTimeoutException("Task exceeded maximum timeout value (5 seconds)")
    ) == {
        "type": "JobTimeout",
        "message": "The job ran longer than its 5 s timeout and was stopped.",
    }
    assert describe_exception(job, ValueError("bad value")) == {"type": "ValueError", "message": "bad value"}
    assert describe_exception(job, KeyError())["message"] == "KeyError"


def test_settings_come_from_the_environment():
    settings = Settings.from_env(
        {"REDIS_URL": "redis://r:1/2", "RESULT_TTL": "90000", "EXTRA_JOB_MODULES": "a, b"}
    )
    assert settings.redis_url == "redis://r:1/2"
    assert settings.result_ttl == 90000
    assert settings.extra_job_modules == ("a", "b")
    assert Settings.from_env({}).result_ttl >= 24 * 3600


@pytest.mark.parametrize("raw", ["ten", "-1", "1.5"])
def test_bad_numeric_settings_are_refused(raw):
    with pytest.raises(ValueError, match="RESULT_TTL"):
        Settings.from_env({"RESULT_TTL": raw})


def test_overrides_must_name_real_settings():
    with pytest.raises(ValueError, match="unknown settings"):
        Settings().with_overrides({"no_such_setting": 1})
