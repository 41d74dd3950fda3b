"""Job types used only by the tests, registered through EXTRA_JOB_MODULES=tests.fixtures."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import suppress
from typing import Literal

import redis
from pydantic import Field
from rq import Worker as RQWorker
from rq import get_current_job

from jobs.engine.worker import Worker
from jobs.families import EMBED
from jobs.index.embedding import get_encoder
from jobs.index.store import DocumentStore
from jobs.types.embed import EmbedInput, describe_embed, prepare_embed
from jobs.types.registry import JobType
from jobs.types.schema import JobInput


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


class PausingEmbedInput(EmbedInput):
    pause: Literal["before_write", "after_write"]


def embed_and_pause(documents: list[dict], revision: int, pause: str) -> dict:
    """The embed job's real steps, with a stop on the first attempt where a test kills it.

    The process publishes its pid at `afterward-test:pid:<job id>` and then waits to be killed.
    """
    job = get_current_job()
    first_attempt = job.connection.incr(f"afterward-test:attempt:{job.id}") == 1
    encoder = get_encoder()
    vectors = encoder.encode([d["text"] for d in documents])
    if first_attempt and pause == "before_write":
        _wait_to_be_killed(job)
    outcome = DocumentStore(job.connection).upsert(documents, vectors, revision, model=encoder.name)
    if first_attempt and pause == "after_write":
        _wait_to_be_killed(job)
    return {"indexed": [d["id"] for d, o in zip(documents, outcome, strict=True) if o == "indexed"]}


def _wait_to_be_killed(job) -> None:
    job.connection.set(f"afterward-test:pid:{job.id}", os.getpid())
    time.sleep(600)


JOB_TYPES["embed_and_pause"] = JobType(
    embed_and_pause,
    PausingEmbedInput,
    family=EMBED,
    prepare=lambda fields: {**prepare_embed(fields), "pause": fields["pause"]},
    describe=describe_embed,
)


class HoldInput(JobInput):
    seconds: float = Field(gt=0, le=3600)


def hold(seconds: float) -> dict:
    """Publish this process's pid, then run `seconds` on the first attempt; later attempts end at once.

    Tests kill the process at a known point: after `afterward-test:pid:<job id>` appears.
    """
    job = get_current_job()
    attempt = job.connection.incr(f"afterward-test:attempt:{job.id}")
    job.connection.set(f"afterward-test:pid:{job.id}", os.getpid())
    if attempt == 1:
        time.sleep(seconds)
    return {"attempt": attempt}


JOB_TYPES["hold"] = JobType(hold, HoldInput)


class PausingWorker(Worker):
    """Our worker, stopped between taking a job and starting it: the multi-queue crash window."""

    def execute_job(self, job, queue) -> None:
        self.connection.set(f"afterward-test:dequeued:{job.id}", os.getpid())
        time.sleep(600)


class StockPausingWorker(RQWorker):
    """Stock RQ's worker, stopped at the same point."""

    def execute_job(self, job, queue) -> None:
        self.connection.set(f"afterward-test:dequeued:{job.id}", os.getpid())
        time.sleep(600)


class TamperInput(JobInput):
    directory: str
    fail: bool = False


def tamper(directory: str, fail: bool = False) -> dict:
    """Change what a job can change in its process (directory, environment, umask, a signal
    handler), then succeed or fail."""
    os.chdir(directory)
    os.environ["AFTERWARD_TEST_TAMPERED"] = "yes"
    os.umask(0o077)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if fail:
        raise RuntimeError("tampered, then failed")
    return {"pid": os.getpid()}


class InspectInput(JobInput):
    pass


def inspect_process() -> dict:
    """What a job sees of its process, and which signals a process it starts ignores."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        ignored = _ignored_signals(child.pid)
    finally:
        child.kill()
        child.wait()
    umask = os.umask(0)
    os.umask(umask)
    return {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "tampered": os.environ.get("AFTERWARD_TEST_TAMPERED"),
        "umask": umask,
        "sigusr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
        "child_ignores": ignored,
    }


def _ignored_signals(pid: int) -> list[int]:
    for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: SIM115
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return [signum for signum in range(1, 65) if mask & (1 << (signum - 1))]
    return []


class HogInput(JobInput):
    megabytes: int = Field(ge=1, le=4096)


_HOARD: list[bytearray] = []


def hog(megabytes: int) -> dict:
    """Succeed, keeping `megabytes` of memory referenced (resident) after the job ends."""
    _HOARD.append(bytearray(os.urandom(1024)) * (megabytes * 1024))
    return {"pid": os.getpid()}


def mark(*args: object) -> None:
    """Not a registered job function: if anything ever calls it, a key says so."""
    job = get_current_job()
    connection = job.connection if job else redis.Redis.from_url(os.environ["REDIS_URL"])
    connection.set("afterward-test:marked", "yes")


JOB_TYPES["tamper"] = JobType(tamper, TamperInput)
JOB_TYPES["inspect"] = JobType(inspect_process, InspectInput)
JOB_TYPES["hog"] = JobType(hog, HogInput)


class NoteInput(JobInput):
    value: int
    fail: bool = Field(default=False, description="A bad input: its job fails, alone or in a batch.")
    hold: float = Field(default=0, ge=0, le=600, description="Seconds the first batch run waits.")


def note(value: int, fail: bool = False, hold: float = 0) -> dict:
    """One job's run: its value back, or a failure for a bad input."""
    if fail:
        raise ValueError(f"bad value {value}")
    return {"value": value, "together": 1}


def note_many(calls: list[dict], connection: redis.Redis) -> list[dict]:
    """Jobs of `note` run together. Fails whole when one input is bad. On the first batch
    with a `hold`, publishes its pid and waits that long, to be stopped mid-batch."""
    if any(call.get("fail") for call in calls):
        raise ValueError("a bad value in the batch")
    hold_for = max(call.get("hold", 0) for call in calls)
    if hold_for and connection.incr("afterward-test:note-batches") == 1:
        connection.set("afterward-test:note-pid", os.getpid())
        time.sleep(hold_for)
    return [{"value": call["value"], "together": len(calls)} for call in calls]


JOB_TYPES["note"] = JobType(note, NoteInput, family=EMBED, run_many=note_many)
