"""The RQ job class Afterward uses everywhere: JSON only, registered functions only."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.utils import as_text

from jobs import keys
from jobs.engine import fair
from jobs.engine.errors import UnregisteredJobError
from jobs.settings import get_settings
from jobs.times import now

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
        # Whose fair share the job runs in (jobs.engine.fair), and the most jobs of that owner
        # it may run beside (KEY_MAX_ACTIVE when it was accepted); None: no owner, no cap.
        self.owner: str | None = None
        self.max_active: int | None = None

    @property
    def depends_on_ids(self) -> list[str]:
        """The ids of the jobs this one waits for, as it was written or read with them.

        RQ keeps them in memory only under a private name; its public `dependency_ids` reads
        them back from Redis, where a job being written in a transaction has none yet.
        """
        return list(self._dependency_ids)

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

    def to_dict(self, include_meta: bool = True, include_result: bool = True) -> dict:
        data = super().to_dict(include_meta=include_meta, include_result=include_result)
        if self.owner is not None:
            data[keys.JOB_OWNER_FIELD] = self.owner
        if self.max_active is not None:
            data[keys.JOB_MAX_ACTIVE_FIELD] = self.max_active
        return data

    def restore(self, raw_data: Any) -> Any:
        super().restore(raw_data)
        self.recorded_started_at = self.started_at
        self.attempts = int(_field(raw_data, keys.JOB_ATTEMPTS_FIELD) or 0)
        owner = _field(raw_data, keys.JOB_OWNER_FIELD)
        self.owner = (owner.decode() if isinstance(owner, bytes) else owner) or None
        max_active = _field(raw_data, keys.JOB_MAX_ACTIVE_FIELD)
        self.max_active = int(max_active) if max_active else None
        self.callback_names = {
            field: name.decode() if isinstance(name, bytes) else name
            for field in CALLBACK_FIELDS
            if (name := _field(raw_data, field))
        }
        callback = _field(raw_data, CALLBACK_FIELD)
        self.callback = json.loads(callback) if callback else None

    # ------------------------------------------------------------------ leaving the queue

    def cancel(
        self, pipeline: Pipeline | None = None, enqueue_dependents: bool = False, **kwargs: Any
    ) -> dict[str, list[str]]:
        """RQ's cancel; off its queue, out of its owner's place in the fair share (its next job
        moves up), and, unless RQ is asked to queue them, its dependents end canceled too
        (jobs.engine.dependencies). With `enqueue_dependents` they are queued through the
        engine's Queue, not RQ's."""
        if enqueue_dependents and pipeline is None:
            return self._cancel_queuing_dependents(**kwargs)
        moved = super().cancel(pipeline=pipeline, enqueue_dependents=enqueue_dependents, **kwargs)
        self._leave_fair_share(pipeline)
        if pipeline is None and not enqueue_dependents:
            from jobs.engine import dependencies

            dependencies.settle_dependents(self.connection, self.id)
        return moved

    def _cancel_queuing_dependents(self, **kwargs: Any) -> dict[str, list[str]]:
        """RQ's cancel(enqueue_dependents=True), in its own watched transaction as RQ's is, with
        the dependents it readies queued by the engine's Queue after the commit."""
        from jobs.engine.queue import Queue

        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.dependents_key)
                    moved = super().cancel(pipeline=pipe, enqueue_dependents=True, **kwargs)
                    if not pipe.explicit_transaction:
                        pipe.multi()
                    self._leave_fair_share(pipe)
                    pipe.execute()
                    break
                except WatchError:
                    continue
        Queue(self.origin, connection=self.connection).enqueue_ready_jobs_by_queue(moved)
        return moved

    def delete(self, pipeline: Pipeline | None = None, remove_from_queue: bool = True, **kwargs: Any) -> None:
        # RQ deletes the job's dependents set with it: read first, to settle them after.
        dependents = self.dependent_ids if pipeline is None else []
        super().delete(pipeline=pipeline, remove_from_queue=remove_from_queue, **kwargs)
        if remove_from_queue:
            self._leave_fair_share(pipeline)
        connection = pipeline if pipeline is not None else self.connection
        connection.zrem(keys.stopped(self.origin), self.id)
        if owner := self.meta.get("owner"):
            for status in RETRYABLE_INDEXES:
                connection.zrem(keys.retryable(owner, status), self.id)
        if dependents:  # a deleted dependency counts as met, as in RQ
            from jobs.engine import dependencies

            dependencies.settle(self.connection, dependents)

    def dependencies_are_met(
        self,
        parent_job: RQJob | None = None,
        pipeline: Pipeline | None = None,
        exclude_job_id: str | None = None,
        refresh_job_status: bool = True,
    ) -> bool:
        """RQ's test, with the engine's verdict (jobs.engine.dependencies): every dependency
        finished or gone; with `allow_dependency_failures`, every one ended, whichever way."""
        from jobs.engine import dependencies

        connection = pipeline if pipeline is not None else self.connection
        if pipeline is not None:
            connection.watch(*[self.key_for(dependency_id) for dependency_id in self.depends_on_ids])
        ids = [as_text(member) for member in connection.smembers(self.dependencies_key)]
        ids = [job_id for job_id in ids if job_id != exclude_job_id]
        statuses = dependencies.statuses_of(self.connection, ids)
        if parent_job is not None and parent_job.id in statuses:
            # RQ's success handler passes the job whose end it is recording, before the status
            # is written: as in RQ, that job is done unless it ended badly.
            parent = parent_job.get_status(refresh=refresh_job_status).value
            statuses[parent_job.id] = (
                parent if parent in dependencies.ENDED_BADLY else JobStatus.FINISHED.value
            )
        found = dependencies.verdict(statuses, bool(self.allow_dependency_failures))
        return found is not None and found.run

    def _leave_fair_share(self, pipeline: Pipeline | None) -> None:
        if self.owner is None or not self.origin:
            return
        client = pipeline if pipeline is not None else self.connection
        fair.forget(client, self.origin, self.id, self.owner, self.redis_job_namespace_prefix)

    # ------------------------------------------------------------------ failing for good

    def _handle_failure(self, exc_string: str, pipeline: Pipeline, *args: Any, **kwargs: Any) -> None:
        """RQ records every final failure through here (a worker's, and maintenance's for an
        abandoned job): also its end time, when no one set it, and the indexes GET /queues and
        bulk retries read (jobs stopped per queue, each owner's failed and stopped jobs: the
        owner in the job's meta, the API key's or `public`)."""
        if self.ended_at is None:
            self.ended_at = now()  # written with the job by the failed registry's save
        super()._handle_failure(exc_string, pipeline, *args, **kwargs)
        ttl = DEFAULT_FAILURE_TTL if self.failure_ttl is None else self.failure_ttl
        stopped = self.get_status(refresh=False) == JobStatus.STOPPED
        if stopped:  # scored like the failed registry's entry: when it expires
            pipeline.zadd(keys.stopped(self.origin), {self.id: ttl if ttl < 0 else time.time() + ttl})
        if owner := self.meta.get("owner"):
            index = keys.retryable(owner, "stopped" if stopped else "failed")
            ended = self.ended_at.timestamp()
            pipeline.zadd(index, {self.id: ended})
            if ttl > 0:  # entries of jobs expired since go as the index is written
                pipeline.zremrangebyscore(index, "-inf", ended - ttl)
        if self.meta.get("batch_id"):  # its batch may end with it, in the same transaction
            from jobs import batches  # which imports this module

            batches.job_ended(pipeline, self)


# The owner's indexes of jobs a bulk retry can take (keys.retryable).
RETRYABLE_INDEXES = ("failed", "stopped")


def _field(raw_data: Any, name: str) -> Any:
    return raw_data.get(name) or raw_data.get(name.encode())
