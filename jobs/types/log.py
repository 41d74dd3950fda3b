"""The `log` job: append one line to the job log."""

from __future__ import annotations

import json
import os
import sys
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from rq import get_current_job

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


# Characters some line readers (Python's str.splitlines among them) treat as line breaks,
# which json.dumps leaves alone when it keeps non-ASCII text readable.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def encode_line(record: dict) -> str:
    """One JSON object on one line, whatever the text inside: no message can forge a line."""
    # json.dumps escapes \n, \r and every other control character below U+0020.
    return json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS)


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
