"""The job types Afterward runs: the one place a job type is registered.

A job type is a plain function plus a pydantic input schema. The web process validates a
request body against the schema and enqueues the function by its dotted path with the
validated fields as keyword arguments; workers refuse any function not listed here.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jobs.families import EMBED, GENERAL
from jobs.types.embed import (
    EmbedInput,
    admit_embed,
    describe_embed,
    embed_documents,
    embed_many,
    embed_progress,
    prepare_embed,
)
from jobs.types.log import LogInput, write_log
from jobs.types.schema import OPTION_FIELDS, JobInput
from jobs.types.sleep import SleepInput, sleep_for

DEFAULT_TIMEOUT = 180
# Names of routes beside `POST /jobs/<type>`: a job type of that name could never be submitted
# (`POST /jobs/retry` runs failed jobs again), so none may take one.
RESERVED_TYPE_NAMES = frozenset({"retry"})


@dataclass(frozen=True)
class JobType:
    """A function workers run and the schema of its keyword arguments."""

    func: Callable[..., Any]
    input: type[JobInput]
    # Timeout (seconds) when the client sets none: a number or a function of the input.
    default_timeout: int | Callable[[Any], int] = DEFAULT_TIMEOUT
    # Queue family: its own RQ queues and process type (see jobs.types.schema).
    family: str = GENERAL
    # Turns validated fields into the function's keyword arguments (e.g. assigns ids).
    prepare: Callable[[dict], dict] | None = None
    # The function takes the submitting key's owner name as its `owner` keyword argument.
    owned: bool = False
    # At submit, once the request is known to be a new one (not a repeat of an accepted one):
    # checks it against what its owner already has. (keyword arguments, owner, the web's Redis
    # client, settings) in; raises to refuse (jobs.index.store.QuotaExceededError: a 429).
    admit: Callable[[dict, str, Any, Any], None] | None = None
    # Extra fields of the job view, computed once from the keyword arguments.
    describe: Callable[[dict], dict] | None = None
    # Runs several jobs of this type at once: their keyword arguments (and the worker's Redis
    # client) in, one result each out, all or nothing. Workers that take jobs in batches (the
    # embedder) use it.
    run_many: Callable[[list[dict], Any], list[Any]] | None = None
    # The progress a job run through `run_many` ends with (it reports none on its own way).
    final_progress: Callable[[dict], dict] | None = None

    @property
    def path(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"

    def timeout_for(self, data: JobInput) -> int:
        if callable(self.default_timeout):
            return self.default_timeout(data)
        return self.default_timeout


JOB_TYPES: dict[str, JobType] = {
    "log": JobType(write_log, LogInput, default_timeout=60),
    "sleep": JobType(sleep_for, SleepInput, default_timeout=lambda data: math.ceil(data.seconds) + 60),
    "embed": JobType(
        embed_documents,
        EmbedInput,
        default_timeout=300,
        family=EMBED,
        prepare=prepare_embed,
        owned=True,
        admit=admit_embed,
        describe=describe_embed,
        run_many=embed_many,
        final_progress=embed_progress,
    ),
}


@lru_cache(maxsize=8)
def job_types(extra_modules: tuple[str, ...] = ()) -> Mapping[str, JobType]:
    """Built-in job types plus those of `extra_modules` (each with its own JOB_TYPES)."""
    types = dict(JOB_TYPES)
    for name in extra_modules:
        module = importlib.import_module(name)
        types.update(module.JOB_TYPES)
    for type_name, job_type in types.items():
        if type_name in RESERVED_TYPE_NAMES:
            raise ValueError(f"{type_name!r} cannot name a job type: POST /jobs/{type_name} is another route")
        clash = OPTION_FIELDS & set(job_type.input.model_fields)
        if clash:
            raise ValueError(f"job type {type_name!r} uses reserved field names: {sorted(clash)}")
    return types


@lru_cache(maxsize=8)
def by_function(extra_modules: tuple[str, ...] = ()) -> Mapping[str, JobType]:
    """Job types by the dotted path of their function (what a job hash names)."""
    return {job_type.path: job_type for job_type in job_types(extra_modules).values()}


@lru_cache(maxsize=8)
def allowed_functions(extra_modules: tuple[str, ...] = ()) -> frozenset[str]:
    """Dotted paths of every function a worker may run."""
    return frozenset(job_type.path for job_type in job_types(extra_modules).values())
