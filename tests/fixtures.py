"""Job types used only by the tests, registered through EXTRA_JOB_MODULES=tests.fixtures."""

from __future__ import annotations

import os
import signal
import time
from contextlib import suppress

from pydantic import Field
from rq import get_current_job

from jobs.registry import JobType
from jobs.schema import JobInput


class FlakyInput(JobInput):
    failures: int = Field(ge=0, le=10, description="Attempts that fail before one succeeds.")


def fail_then_succeed(failures: int) -> dict:
    """Raise on the first `failures` attempts, succeed on the next one."""
    job = get_current_job()
    attempt = job.connection.incr(f"afterward-test:flaky:{job.id}")
    if attempt <= failures:
        raise RuntimeError(f"planned failure on attempt {attempt}")
    return {"attempt": attempt}


class StubbornInput(JobInput):
    seconds: float = Field(gt=0, le=600)


def ignore_timeout(seconds: float) -> dict:
    """Swallow every exception (the timeout's included) and keep running."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with suppress(Exception):
            time.sleep(0.1)
    return {"survived": True}


class CrashInput(JobInput):
    pass


def crash() -> None:
    """Kill the process running the job, as a segfault or the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


JOB_TYPES = {
    "flaky": JobType(fail_then_succeed, FlakyInput),
    "stubborn": JobType(ignore_timeout, StubbornInput),
    "crash": JobType(crash, CrashInput),
}
