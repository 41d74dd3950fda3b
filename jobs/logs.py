"""Structured logs: one JSON object per line on stdout, from web and worker processes alike.

Every event carries the request id (accepted from X-Request-ID or made up by the web
process, and stored with the job) and the job id, when there is one, so a job can be
followed from the request that created it through every worker that ran it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

# Characters json.dumps leaves as they are when it keeps non-ASCII text readable, but that a
# terminal or a line reader acts on: DEL and the C1 controls (U+009B starts an escape
# sequence in some terminals, U+0085 is a line break to some readers), the Unicode line and
# paragraph separators, and the bidirectional embeddings, overrides and isolates that make
# a line display differently from what it says. Escaped as \uXXXX, so text round-trips.
UNSAFE_CODEPOINTS = (0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_ESCAPES = str.maketrans({code: f"\\u{code:04x}" for code in UNSAFE_CODEPOINTS})


def escape_unsafe(encoded_json: str) -> str:
    """JSON text with every UNSAFE_CODEPOINTS character escaped; the decoded value is the same.

    Only for JSON text (these characters are never JSON syntax, so they occur only inside strings).
    """
    return encoded_json.translate(_ESCAPES)


request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)

FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}


class ContextFilter(logging.Filter):
    """Adds the current request and job ids to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.job_id = job_id.get()
        return True


class SafeJsonFormatter(JsonFormatter):
    """One JSON line per event, with terminal controls escaped (request paths, messages)."""

    def jsonify_log_record(self, log_data) -> str:
        return escape_unsafe(super().jsonify_log_record(log_data))


def formatter() -> JsonFormatter:
    return SafeJsonFormatter(
        FIELDS + " %(request_id)s %(job_id)s",
        rename_fields=RENAMED,
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        json_ensure_ascii=False,
    )


class StdoutHandler(logging.StreamHandler):
    """A handler on whatever sys.stdout is when an event is written."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(level: str = "INFO") -> None:
    """Send every log event of this process to stdout as one JSON line (once per process)."""
    root = logging.getLogger()
    if any(isinstance(handler, StdoutHandler) for handler in root.handlers):
        return
    handler = StdoutHandler()
    handler.setFormatter(formatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)


@contextmanager
def context(job: str | None = None, request: str | None = None) -> Iterator[None]:
    """Within the block, log events carry these ids."""
    job_token = job_id.set(job) if job is not None else None
    request_token = request_id.set(request) if request is not None else None
    try:
        yield
    finally:
        if job_token is not None:
            job_id.reset(job_token)
        if request_token is not None:
            request_id.reset(request_token)


# `logging.config.dictConfig` form, for the rq command line (jobs.rq_settings.DICT_CONFIG).
DICT_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": ContextFilter}},
    "formatters": {"json": {"()": formatter}},
    "handlers": {
        "stdout": {"()": StdoutHandler, "formatter": "json", "filters": ["context"]},
    },
    "root": {"handlers": ["stdout"], "level": "INFO"},
}
