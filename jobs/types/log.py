"""The `log` job: append one line to the job log."""

from __future__ import annotations

import json
import os
import sys
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from rq import get_current_job

from jobs.logs import escape_unsafe
from jobs.settings import get_settings
from jobs.times import iso, now
from jobs.types.schema import JobInput, limits, within


class LogInput(JobInput):
    message: str = Field(min_length=1, description="Text to log: 1 to MAX_LOG_CHARS characters, any Unicode.")
    level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("message")
    @classmethod
    def _fits(cls, message: str, info: ValidationInfo) -> str:
        return within(message, limits(info).max_log_chars, "message")


def write_log(message: str, level: str = "info") -> dict:
    """Append one JSON line with time, level, job id and message to LOG_FILE and stdout."""
    job = get_current_job()
    record = {
        "time": iso(now()),
        "level": level,
        "job_id": job.id if job else None,
        "message": message,
    }
    line = (encode_line(record) + "\n").encode("utf-8")
    _append(get_settings().log_file, line)
    sys.stdout.buffer.write(line)
    sys.stdout.flush()
    return {"logged_at": record["time"], "level": level, "characters": len(message)}


def encode_line(record: dict) -> str:
    """One JSON object on one line, whatever the text inside: no message can forge a line.

    Nor drive a terminal: json.dumps escapes \\n, \\r and every control character below
    U+0020; DEL, the C1 controls, Unicode line separators and bidirectional overrides are
    escaped too (jobs.logs.escape_unsafe).
    """
    return escape_unsafe(json.dumps(record, ensure_ascii=False))


def _append(path: str, line: bytes) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    # One write() on an O_APPEND descriptor: concurrent workers never interleave lines.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)
