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


def formatter() -> JsonFormatter:
    return JsonFormatter(
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
