"""The RQ job class Afterward uses everywhere: JSON only, registered functions only."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from redis.client import Pipeline
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from jobs import keys
from jobs.engine.errors import UnregisteredJobError
from jobs.settings import get_settings

TERMINAL_STATUSES = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED})

# The job hash fields that name a function RQ would import and call besides the job's own.
CALLBACK_FIELDS = ("success_callback_name", "failure_callback_name", "stopped_callback_name")

# The job hash field holding its completion webhook's URL and delivery state (jobs.callbacks).
CALLBACK_FIELD = "afterward_callback"

# Job functions by their dotted paths before jobs/ was split into types, engine and index:
# a job queued before an upgrade still runs after it.
LEGACY_PATHS = {
    "jobs.log.write_log": "jobs.types.log.write_log",
    "jobs.sleep.sleep_for": "jobs.types.sleep.sleep_for",
    "jobs.embed.embed_documents": "jobs.types.embed.embed_documents",
}


def allowed_functions() -> frozenset[str]:
    from jobs.types.registry import allowed_functions as registered

    return registered(get_settings().extra_job_modules)


class Job(RQJob):
    """An RQ job that is always JSON and only ever calls registered functions.

    A job's function and its callbacks are checked against the job type registry before any
    of them is imported: a job written into Redis by someone else runs nothing it names.
    """

    def __init__(self, id: str | None = None, connection: Any = None, serializer: Any = None):
        # Whatever a caller asks for, no job is ever pickled or unpickled.
        super().__init__(id, connection=connection, serializer=JSONSerializer)
        self.attempts = 0
        self.callback_names: dict[str, str] = {}
        # The completion webhook's URL and delivery state, when the job has one.
        self.callback: dict[str, Any] | None = None
        # The hash the job was restored from, when a worker's dequeue read it.
        self.hash: dict[bytes, bytes] = {}
        # The jobs a worker took off the queue together with this one (jobs.engine.queue).
        self.companions: list[Job] = []
        # When the worker marked the job started, as its hash says (see `perform`).
        self.recorded_started_at: datetime | None = None

    @property
    def func_name(self) -> str:
        name = super().func_name
        return LEGACY_PATHS.get(name, name)

    @func_name.setter
    def func_name(self, value: str) -> None:
        RQJob.func_name.fset(self, value)  # type: ignore[attr-defined]

    @property
    def func(self) -> Any:
        self.check_registered()
        return super().func

    def check_registered(self) -> None:
        """Raise UnregisteredJobError unless the function and every callback are registered."""
        allowed = allowed_functions()
        if self.instance is not None or self.func_name not in allowed:
            raise UnregisteredJobError(f"{self.func_name!r} is not a registered job function; it was not run")
        for field in self.callback_names:
            self._check_callback(field, allowed)

    @property
    def success_callback(self) -> Any:
        self._check_callback("success_callback_name")
        return super().success_callback

    @property
    def failure_callback(self) -> Any:
        self._check_callback("failure_callback_name")
        return super().failure_callback

    @property
    def stopped_callback(self) -> Any:
        self._check_callback("stopped_callback_name")
        return super().stopped_callback

    def _check_callback(self, field: str, allowed: frozenset[str] | None = None) -> None:
        name = self.callback_names.get(field)
        if name is not None and name not in (allowed or allowed_functions()):
            what = field.removesuffix("_name").replace("_", " ")
            raise UnregisteredJobError(f"the {what} {name!r} is not a registered job function; nothing ran")

    def perform(self) -> Any:
        # RQ's perform_job stamps `started_at` again in the work-horse, just before this call,
        # a moment after the worker recorded it with the job's execution; the job's end would
        # save that second time, and a job would seem to start twice. One start: the recorded one.
        if self.recorded_started_at is not None:
            self.started_at = self.recorded_started_at
        # Before anything runs: a refused callback must not let the function run either.
        self.check_registered()
        return super().perform()

    def prepare_for_execution(self, worker_name: str, pipeline: Pipeline) -> None:
        super().prepare_for_execution(worker_name, pipeline)
        self.recorded_started_at = self.started_at
        # Counted in the same transaction that marks the job started.
        pipeline.hincrby(self.key, keys.JOB_ATTEMPTS_FIELD, 1)
        self.attempts += 1

    def restore(self, raw_data: Any) -> Any:
        super().restore(raw_data)
        self.recorded_started_at = self.started_at
        self.attempts = int(_field(raw_data, keys.JOB_ATTEMPTS_FIELD) or 0)
        self.callback_names = {
            field: name.decode() if isinstance(name, bytes) else name
            for field in CALLBACK_FIELDS
            if (name := _field(raw_data, field))
        }
        callback = _field(raw_data, CALLBACK_FIELD)
        self.callback = json.loads(callback) if callback else None


def _field(raw_data: Any, name: str) -> Any:
    return raw_data.get(name) or raw_data.get(name.encode())
