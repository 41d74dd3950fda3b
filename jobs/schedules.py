"""Recurring schedules: a `POST /jobs/<type>` request kept in Redis and submitted at every tick.

A schedule is a hash (keys.schedule): its owner, the job type and body, its timing (`cron` in
a timezone, or `every` N seconds), whether it is paused, and what its ticks did. Schedules
that are not paused are also in one sorted set, scored by their next tick (keys.SCHEDULES_DUE).

The ticker is a thread in every worker process (jobs.engine.worker). One of them leads: it
holds a lock (RQ's own lock script, renewed every second, lasting LOCK_SECONDS) and ticks what
is due; the others only try the lock once a second, and one of them takes over within
LOCK_SECONDS + 1 s of the leader's death. The lock only spares Redis the others' work:
exactly one job per tick comes from the tick itself, which WATCHes the schedule's hash and, in
one MULTI/EXEC, writes the job and moves the schedule's next tick on. Two tickers that claim
the same tick (a leader stalled past its lock, and the one that took over) make one job; the
other's transaction fails and it writes nothing.

Ticks missed while no ticker ran become one job, for the first of them; the schedule then goes
on from its first tick after now (`Timing.following`). A tick is a submission without a
request: jobs.submission validates and builds its job, and with API keys the job takes a place
in its key's share (jobs.quota) like any other; a tick refused there is recorded on the
schedule (`refused`, `last_error`) and the schedule goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

import redis
from croniter import CroniterBadCronError, CroniterBadDateError, croniter
from rq.scripts import ACQUIRE_OR_REFRESH_LOCK_SCRIPT, release_lock

from jobs import keys, submission
from jobs.engine.queue import Queue
from jobs.families import EMBED, GENERAL, family_queues
from jobs.index.store import QuotaExceededError
from jobs.refusals import ApiError
from jobs.settings import Settings
from jobs.times import iso_timestamp
from jobs.types.registry import job_types

log = logging.getLogger(__name__)

DAY = 24 * 3600
# Bounds of `every`, in whole seconds: a tick a second at most, a year apart at most.
MIN_EVERY = 1
MAX_EVERY = 365 * DAY
MAX_CRON_CHARS = 100
MAX_NAME_CHARS = 100
DEFAULT_TIMEZONE = "UTC"
# Standard five-field expressions, and these shorthands (RQ's cron accepts the same).
CRON_ALIASES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
# Files of the tz database that name no place.
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})

# The leader's lock lasts this long unless renewed; it is renewed at every look (LOOK_SECONDS).
LOCK_SECONDS = 5
LOOK_SECONDS = 1.0
# Most schedules one look ticks; more due are ticked by the next look, at once.
BATCH = 100
# Schedule ids, like job ids: uuid4 hex.
SCHEDULE_ID_LENGTH = 32


class NoSuchSchedule(Exception):
    """No schedule with that id belongs to the caller."""


class TooManySchedules(Exception):
    def __init__(self, count: int, cap: int) -> None:
        super().__init__(f"{count} schedules, the cap is {cap}")
        self.count, self.cap = count, cap


# ---------------------------------------------------------------- timing


def check_cron(expression: str) -> str:
    """The expression, spaces normalized; ValueError when it is not one we run."""
    text = " ".join(expression.split())
    if not text:
        raise ValueError("cron must not be empty")
    if len(text) > MAX_CRON_CHARS:
        raise ValueError(f"cron is at most {MAX_CRON_CHARS} characters")
    if text.startswith("@"):
        if text.lower() not in CRON_ALIASES:
            raise ValueError(f"unknown shorthand; the shorthands are {', '.join(sorted(CRON_ALIASES))}")
        text = text.lower()
    elif len(text.split()) != 5:
        raise ValueError("cron has five fields: minute hour day-of-month month day-of-week")
    if not croniter.is_valid(text):
        raise ValueError("not a valid cron expression, e.g. */5 * * * * (every five minutes)")
    return text


def check_timezone(name: str) -> str:
    if name not in _zones():
        raise ValueError("unknown timezone: give an IANA name such as UTC, Europe/Berlin or America/New_York")
    return name


@cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones()) - _NOT_ZONES


@dataclass(frozen=True)
class Timing:
    """When a schedule ticks: a cron expression evaluated in `timezone`, or every N seconds."""

    cron: str | None = None
    every: int | None = None
    timezone: str = DEFAULT_TIMEZONE

    def first_after(self, moment: float) -> float:
        """The first tick after `moment` (Unix time): at creation and at resume."""
        if self.every is not None:
            return round(moment + self.every, 3)
        return self._next_cron(moment)

    def following(self, due: float, moment: float) -> float:
        """The tick after the one due at `due`, claimed at `moment` (>= `due`): the first after
        `moment`, so ticks missed meanwhile are skipped. `every` keeps its rhythm (due + k * every)."""
        if self.every is not None:
            return round(due + (math.floor((moment - due) / self.every) + 1) * self.every, 3)
        return self._next_cron(max(due, moment))

    def _next_cron(self, moment: float) -> float:
        """The first time after `moment` the expression matches, in the timezone's local time.

        A local time the clocks skip (spring forward) runs at the first instant after the gap;
        a local time they repeat (fall back) runs once, at its first occurrence, as in RQ's cron.
        """
        assert self.cron is not None
        zone = ZoneInfo(self.timezone)
        candidates = croniter(self.cron, datetime.fromtimestamp(moment, zone))
        # Bounded: each repeated local time is skipped once, and there are few in a row.
        for _ in range(120):
            candidate = candidates.get_next(datetime).astimezone(zone)
            first = candidate.replace(tzinfo=None).replace(tzinfo=zone, fold=0)
            if first.timestamp() < candidate.timestamp():
                continue  # the second occurrence of a repeated local time
            if candidate.timestamp() > moment:
                return candidate.timestamp()
        raise ValueError("the cron expression matches no time")  # pragma: no cover - defensive

    def check(self, moment: float) -> None:
        """ValueError when the expression never matches (e.g. 0 0 30 2 *: February 30)."""
        try:
            self.first_after(moment)
        except (CroniterBadDateError, CroniterBadCronError, ValueError):
            raise ValueError("the cron expression matches no date") from None


# ---------------------------------------------------------------- storage


@dataclass
class Schedule:
    id: str
    owner: str
    type: str
    job: dict[str, Any]
    timing: Timing
    created_at: float
    next_run_at: float | None  # None while paused
    name: str | None = None
    paused: bool = False
    last_run_at: float | None = None
    last_job_id: str | None = None
    # Ticks that made a job, and ticks refused (quota, or a body no longer valid).
    runs: int = 0
    refused: int = 0
    last_error: dict[str, Any] | None = field(default=None)

    def to_hash(self) -> dict[str, str]:
        return {
            "owner": self.owner,
            "type": self.type,
            "job": json.dumps(self.job, separators=(",", ":")),
            "cron": self.timing.cron or "",
            "every": "" if self.timing.every is None else str(self.timing.every),
            "timezone": self.timing.timezone,
            "name": self.name or "",
            "paused": "1" if self.paused else "0",
            "created_at": repr(self.created_at),
            "next_run_at": _number(self.next_run_at),
            "last_run_at": _number(self.last_run_at),
            "last_job_id": self.last_job_id or "",
            "runs": str(self.runs),
            "refused": str(self.refused),
            "last_error": json.dumps(self.last_error) if self.last_error else "",
        }

    @classmethod
    def from_hash(cls, schedule_id: str, raw: dict[bytes, bytes]) -> Schedule:
        fields = {key.decode(): value.decode() for key, value in raw.items()}
        return cls(
            id=schedule_id,
            owner=fields["owner"],
            type=fields["type"],
            job=json.loads(fields["job"]),
            timing=Timing(
                cron=fields["cron"] or None,
                every=int(fields["every"]) if fields["every"] else None,
                timezone=fields["timezone"],
            ),
            created_at=float(fields["created_at"]),
            next_run_at=_float(fields["next_run_at"]),
            name=fields["name"] or None,
            paused=fields["paused"] == "1",
            last_run_at=_float(fields.get("last_run_at", "")),
            last_job_id=fields.get("last_job_id") or None,
            runs=int(fields.get("runs") or 0),
            refused=int(fields.get("refused") or 0),
            last_error=json.loads(fields["last_error"]) if fields.get("last_error") else None,
        )

    def view(self) -> dict[str, Any]:
        """The schedule as the API shows it."""
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "job": self.job,
            "cron": self.timing.cron,
            "every": self.timing.every,
            "timezone": self.timing.timezone if self.timing.cron else None,
            "paused": self.paused,
            "created_at": iso_timestamp(self.created_at),
            "next_run_at": iso_timestamp(self.next_run_at),
            "last_run_at": iso_timestamp(self.last_run_at),
            "last_job_id": self.last_job_id,
            "runs": self.runs,
            "refused": self.refused,
            "last_error": self.last_error,
        }


def new_id() -> str:
    return uuid.uuid4().hex


def is_schedule_id(text: str) -> bool:
    return len(text) == SCHEDULE_ID_LENGTH and all(c in "0123456789abcdef" for c in text)


def create(connection: redis.Redis, schedule: Schedule, cap: int) -> None:
    """Store `schedule`; TooManySchedules when its owner has `cap` already (0: no cap)."""
    owned = keys.owner_schedules(schedule.owner)
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(owned)  # two creations at the cap: one of them is refused
                count = pipe.scard(owned)
                if cap and count >= cap:
                    raise TooManySchedules(count, cap)
                pipe.multi()
                pipe.hset(keys.schedule(schedule.id), mapping=schedule.to_hash())
                pipe.sadd(owned, schedule.id)
                if schedule.next_run_at is not None:
                    pipe.zadd(keys.SCHEDULES_DUE, {schedule.id: schedule.next_run_at})
                pipe.execute()
                return
            except redis.WatchError:
                continue


def load(connection: redis.Redis, schedule_id: str, owner: str) -> Schedule:
    """The schedule, if it is `owner`'s; NoSuchSchedule otherwise (another key's included)."""
    if not is_schedule_id(schedule_id):
        raise NoSuchSchedule(schedule_id)
    raw = connection.hgetall(keys.schedule(schedule_id))
    if not raw:
        raise NoSuchSchedule(schedule_id)
    schedule = Schedule.from_hash(schedule_id, raw)
    if schedule.owner != owner:
        raise NoSuchSchedule(schedule_id)
    return schedule


def owned_by(connection: redis.Redis, owner: str) -> list[Schedule]:
    """`owner`'s schedules, oldest first."""
    ids = sorted(member.decode() for member in connection.smembers(keys.owner_schedules(owner)))
    with connection.pipeline(transaction=False) as pipe:
        for schedule_id in ids:
            pipe.hgetall(keys.schedule(schedule_id))
        found = [Schedule.from_hash(i, raw) for i, raw in zip(ids, pipe.execute(), strict=True) if raw]
    return sorted(found, key=lambda schedule: (schedule.created_at, schedule.id))


def pause(connection: redis.Redis, schedule_id: str, owner: str) -> Schedule:
    """Stop ticking from the next tick on (idempotent)."""

    def change(schedule: Schedule, pipe: Any) -> None:
        if schedule.paused:
            return
        schedule.paused, schedule.next_run_at = True, None
        pipe.hset(keys.schedule(schedule.id), mapping={"paused": "1", "next_run_at": ""})
        pipe.zrem(keys.SCHEDULES_DUE, schedule.id)

    return _change(connection, schedule_id, owner, change)


def resume(connection: redis.Redis, schedule_id: str, owner: str, moment: float) -> Schedule:
    """Tick again, from the first tick after `moment`: the paused time is not caught up."""

    def change(schedule: Schedule, pipe: Any) -> None:
        if not schedule.paused:
            return
        schedule.paused, schedule.next_run_at = False, schedule.timing.first_after(moment)
        mapping = {"paused": "0", "next_run_at": repr(schedule.next_run_at)}
        pipe.hset(keys.schedule(schedule.id), mapping=mapping)
        pipe.zadd(keys.SCHEDULES_DUE, {schedule.id: schedule.next_run_at})

    return _change(connection, schedule_id, owner, change)


def delete(connection: redis.Redis, schedule_id: str, owner: str) -> Schedule:
    """Remove the schedule; the jobs it made stay."""

    def change(schedule: Schedule, pipe: Any) -> None:
        pipe.delete(keys.schedule(schedule.id))
        pipe.srem(keys.owner_schedules(schedule.owner), schedule.id)
        pipe.zrem(keys.SCHEDULES_DUE, schedule.id)

    return _change(connection, schedule_id, owner, change)


def _change(
    connection: redis.Redis, schedule_id: str, owner: str, change: Callable[[Schedule, Any], None]
) -> Schedule:
    """Read the schedule and write `change` in one transaction, which a tick's claim cannot
    interleave with (both WATCH the hash): the change takes effect at the next tick."""
    if not is_schedule_id(schedule_id):
        raise NoSuchSchedule(schedule_id)
    key = keys.schedule(schedule_id)
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                raw = pipe.hgetall(key)
                if not raw:
                    raise NoSuchSchedule(schedule_id)
                schedule = Schedule.from_hash(schedule_id, raw)
                if schedule.owner != owner:
                    raise NoSuchSchedule(schedule_id)
                pipe.multi()
                change(schedule, pipe)
                pipe.execute()
                return schedule
            except redis.WatchError:
                continue


def _number(value: float | None) -> str:
    return "" if value is None else repr(value)


def _float(text: str) -> float | None:
    return float(text) if text else None


# ---------------------------------------------------------------- the ticker


class Ticker:
    """Ticks due schedules while this process leads; see the module's docstring."""

    def __init__(
        self, connection: redis.Redis, settings: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.clock = clock
        # Who holds the lock: the host and pid say which process leads (operators, tests).
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.leader = False
        self._lock = connection.register_script(ACQUIRE_OR_REFRESH_LOCK_SCRIPT)
        self._queues = {
            name: Queue(name, connection=connection)
            for family in (GENERAL, EMBED)
            for name in family_queues(family)
        }
        self._job_types = dict(job_types(settings.extra_job_modules))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # A daemon thread: it ends with its process, whichever way that ends.
        self._thread = threading.Thread(target=self._run, name="schedule-ticker", daemon=True)
        self._thread.start()

    def stop(self, wait: float = 2.0) -> None:
        """Stop, and hand the lead over at once rather than when the lock expires."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait)
        if self.leader:
            with suppress(redis.RedisError):  # it expires on its own
                release_lock(self.connection, keys.SCHEDULES_TICKER, self.token)
            self.leader = False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pause = self.look()
            except redis.RedisError:  # the worker reports the outage; the lock lapses meanwhile
                pause = LOOK_SECONDS
            except Exception:  # a ticker that stopped would leave the schedules to the others
                log.exception("schedules: a look failed")
                pause = LOOK_SECONDS
            self._stop.wait(pause)

    def look(self) -> float:
        """Take or keep the lead, and as leader tick what is due: seconds until the next look."""
        moment = self.clock()
        if not self.leader:
            outcome = self._lock(keys=[keys.SCHEDULES_TICKER], args=[self.token, LOCK_SECONDS])
            if outcome == 0:
                return LOOK_SECONDS
            self.leader = True
            log.info("schedules: this process ticks them now (%s)", self.token)
            return 0
        with self.connection.pipeline(transaction=False) as pipe:
            self._lock(keys=[keys.SCHEDULES_TICKER], args=[self.token, LOCK_SECONDS], client=pipe)
            pipe.zrangebyscore(keys.SCHEDULES_DUE, "-inf", moment, start=0, num=BATCH)
            pipe.zrange(keys.SCHEDULES_DUE, 0, 0, withscores=True)
            outcome, due, first = pipe.execute()
        if outcome == 0:
            self.leader = False
            log.warning("schedules: another process took the lead")
            return LOOK_SECONDS
        for member in due:
            try:
                self.tick(member.decode())
            except redis.RedisError:
                raise
            except Exception:  # one broken schedule must not hold up the others
                log.exception("schedule %s: could not tick it", member.decode())
        if due:  # look again at once: more may be due (a full batch)
            return 0
        if first:  # sleep until the next tick, renewing the lock at least every LOOK_SECONDS
            return min(LOOK_SECONDS, max(0.01, first[0][1] - self.clock()))
        return LOOK_SECONDS

    def tick(self, schedule_id: str) -> str | None:
        """Claim the schedule's due tick and write its job, in one transaction; the job's id, or
        None when there was nothing to do (not due, paused, deleted, claimed by another) or the
        tick was refused."""
        key = keys.schedule(schedule_id)
        with self.connection.pipeline() as pipe:
            place = None
            try:
                pipe.watch(key)
                raw = pipe.hgetall(key)
                moment = self.clock()
                if not raw:  # deleted: its due entry went with it, unless written meanwhile
                    pipe.multi()
                    pipe.zrem(keys.SCHEDULES_DUE, schedule_id)
                    pipe.execute()
                    return None
                schedule = Schedule.from_hash(schedule_id, raw)
                due = schedule.next_run_at
                if schedule.paused or due is None or due > moment:
                    # Changed since the due set was read (the change moved its entry too), or
                    # an entry out of step: set it right, so it is not read as due again.
                    pipe.multi()
                    if due is None:
                        pipe.zrem(keys.SCHEDULES_DUE, schedule_id)
                    else:
                        pipe.zadd(keys.SCHEDULES_DUE, {schedule_id: due})
                    pipe.execute()
                    return None
                following = schedule.timing.following(due, moment)
                try:
                    prepared, place = self._submission(schedule, due, moment)
                except _Refused as refused:
                    pipe.multi()
                    self._record_refusal(pipe, schedule, following, refused.error, moment)
                    pipe.execute()
                    log.warning("schedule %s: tick at %s refused: %s", schedule_id, iso_timestamp(due),
                                refused.error["message"])  # fmt: skip
                    return None
                pipe.multi()
                submission.enqueue(pipe, prepared, self.settings)
                pipe.hset(
                    key,
                    mapping={
                        "next_run_at": repr(following),
                        "last_run_at": repr(round(moment, 3)),
                        "last_job_id": prepared.job.id,
                    },
                )
                pipe.hincrby(key, "runs", 1)
                pipe.zadd(keys.SCHEDULES_DUE, {schedule_id: following})
                pipe.execute()
            except redis.WatchError:  # paused, resumed, deleted or ticked meanwhile
                if place is not None:
                    with self.connection.pipeline(transaction=False) as undo:
                        place.release(undo)
                        undo.execute()
                return None
        # A job with depends_on whose dependencies ended meanwhile.
        submission.settle(self.connection, [prepared])
        log.info("schedule %s: job %s for the tick at %s", schedule_id, prepared.job.id, iso_timestamp(due))
        return prepared.job.id

    def _submission(self, schedule: Schedule, due: float, moment: float) -> tuple[Any, Any]:
        """The tick's job, built and admitted as `POST /jobs/<type>` would, and its place in its
        key's share (None without API keys); _Refused when the service would refuse it."""
        job_type = self._job_types.get(schedule.type)
        if job_type is None:
            raise _Refused("unknown_job_type", f"Unknown job type {schedule.type!r}.", moment)
        try:
            prepared = submission.prepare(
                self.settings, self._queues, schedule.type, job_type, schedule.job, schedule.owner
            )
            prepared.job.meta.update(schedule=schedule.id, tick=iso_timestamp(due))
            if job_type.admit is not None:
                job_type.admit(prepared.kwargs, schedule.owner, self.connection, self.settings)
        except ApiError as error:
            raise _Refused(error.code, error.message, moment) from None
        except QuotaExceededError as error:
            message = f"The key's documents are at its caps ({error})."
            raise _Refused("quota_exceeded", message, moment) from None
        if not self.settings.api_keys:
            return prepared, None
        size = len(json.dumps(schedule.job, separators=(",", ":")).encode())
        place = submission.Reservation(self.settings, schedule.owner, prepared.job.id, size, moment)
        with self.connection.pipeline(transaction=False) as pipe:
            place.reserve(pipe)
            (answer,) = pipe.execute()
        try:
            submission.check_admitted(answer, self.settings)
        except ApiError as error:
            raise _Refused(error.code, error.message, moment) from None
        return prepared, place

    @staticmethod
    def _record_refusal(pipe: Any, schedule: Schedule, following: float, error: dict, moment: float) -> None:
        key = keys.schedule(schedule.id)
        pipe.hset(key, mapping={"next_run_at": repr(following), "last_error": json.dumps(error)})
        pipe.hincrby(key, "refused", 1)
        pipe.zadd(keys.SCHEDULES_DUE, {schedule.id: following})


class _Refused(Exception):
    """A tick the service refuses, as it would refuse the request: why, for `last_error`."""

    def __init__(self, code: str, message: str, moment: float) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message, "at": iso_timestamp(moment)}
