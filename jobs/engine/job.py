"""The RQ job class Afterward uses everywhere: JSON only, registered functions only."""

from __future__ import annotations

from typing import Any

from redis.client import Pipeline
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from jobs import keys
from jobs.settings import get_settings
from jobs.types.registry import allowed_functions

TERMINAL_STATUSES = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED})


class UnregisteredJobError(Exception):
    """A job names a function that is not a registered job type."""


class Job(RQJob):
    """An RQ job that is always JSON and only ever calls a registered job function."""

    def __init__(self, id: str | None = None, connection: Any = None, serializer: Any = None):
        # Whatever a caller asks for, no job is ever pickled or unpickled.
        super().__init__(id, connection=connection, serializer=JSONSerializer)
        self.attempts = 0

    @property
    def func(self) -> Any:
        name = self.func_name
        if self.instance is not None or name not in allowed_functions(get_settings().extra_job_modules):
            raise UnregisteredJobError(f"{name!r} is not a registered job function; it was not run")
        return super().func

    def prepare_for_execution(self, worker_name: str, pipeline: Pipeline) -> None:
        super().prepare_for_execution(worker_name, pipeline)
        # Counted in the same transaction that marks the job started.
        pipeline.hincrby(self.key, keys.JOB_ATTEMPTS_FIELD, 1)
        self.attempts += 1

    def restore(self, raw_data: Any) -> Any:
        super().restore(raw_data)
        raw = raw_data.get(keys.JOB_ATTEMPTS_FIELD) or raw_data.get(keys.JOB_ATTEMPTS_FIELD.encode())
        self.attempts = int(raw) if raw else 0
