"""The `sleep` job: a long-running job that reports its progress."""

from __future__ import annotations

import time

from pydantic import Field, ValidationInfo, field_validator

from jobs.types.progress import report_progress
from jobs.types.schema import JobInput, limits

# Progress is reported at least this often (seconds).
PROGRESS_EVERY = 0.5


class SleepInput(JobInput):
    seconds: float = Field(gt=0, description="How long to run, in seconds (at most MAX_SLEEP_SECONDS).")

    @field_validator("seconds")
    @classmethod
    def _fits(cls, seconds: float, info: ValidationInfo) -> float:
        limit = limits(info).max_sleep_seconds
        if seconds > limit:
            raise ValueError(f"seconds must be at most {limit}")
        return seconds


def sleep_for(seconds: float) -> dict:
    """Sleep for `seconds`, reporting progress about twice a second."""
    started = time.monotonic()
    deadline = started + seconds
    report_progress(0, f"0 of {seconds:g} s")
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(PROGRESS_EVERY, remaining))
        elapsed = min(seconds, time.monotonic() - started)
        report_progress(100 * elapsed / seconds, f"{elapsed:.1f} of {seconds:g} s")
    return {"slept": seconds}
