"""The schedules API: jobs submitted again and again, on a cron expression or every N seconds.

A schedule's job body is validated at creation exactly as `POST /jobs/<type>` validates it
(jobs.submission.prepare), and again at every tick, when its job is built and written by the
ticker in a worker process (jobs.schedules).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, jsonify, url_for
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from jobs import schedules
from jobs.refusals import validate
from jobs.schedules import (
    DEFAULT_TIMEZONE,
    MAX_CRON_CHARS,
    MAX_EVERY,
    MAX_NAME_CHARS,
    MIN_EVERY,
    NoSuchSchedule,
    Schedule,
    Timing,
    TooManySchedules,
)
from jobs.submission import prepare
from service.body import read_json_object
from service.errors import ApiError
from service.replication import acknowledges_writes
from service.security import current_owner
from service.state import get_state
from service.views.jobs import MAX_TYPE_NAME

bp = Blueprint("schedules", __name__)
log = logging.getLogger(__name__)


class ScheduleBody(BaseModel):
    """`POST /schedules` body: a job request and when to submit it; `cron` or `every`, not both."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"type": "log", "job": {"message": "every five minutes"}, "cron": "*/5 * * * *"},
                {"type": "sleep", "job": {"seconds": 1}, "every": 3600, "name": "hourly nap", "paused": True},
                {"type": "log", "job": {"message": "good morning"}, "cron": "0 9 * * 1-5",
                 "timezone": "Europe/Berlin"},
            ]
        },
    )  # fmt: skip
    type: str = Field(
        min_length=1, max_length=MAX_TYPE_NAME, description="The job type, as in POST /jobs/<type>."
    )
    job: dict[str, Any] = Field(
        default_factory=dict,
        description="The body `POST /jobs/<type>` takes (its fields and the common options), "
        "validated as that route validates it.",
    )
    cron: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CRON_CHARS,
        description="Five-field cron expression (minute hour day-of-month month day-of-week), or "
        "@hourly, @daily, @weekly, @monthly, @yearly; evaluated in `timezone`.",
    )
    every: int | None = Field(
        default=None,
        ge=MIN_EVERY,
        le=MAX_EVERY,
        description=f"Seconds between ticks ({MIN_EVERY} to {MAX_EVERY}, a year); the first is "
        "this long after creation.",
    )
    timezone: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=f"IANA timezone the cron expression is read in (default {DEFAULT_TIMEZONE}); "
        "only with `cron`.",
    )
    paused: bool = Field(default=False, description="Create it paused: no tick until it is resumed.")
    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS, description="A label.")

    @field_validator("type")
    @classmethod
    def _type_is_known(cls, value: str, info: ValidationInfo) -> str:
        known = (info.context or {}).get("job_types")
        if known is not None and value not in known:
            raise ValueError(f"unknown job type; the types are {', '.join(sorted(known))}")
        return value

    @field_validator("cron")
    @classmethod
    def _cron_is_valid(cls, value: str | None) -> str | None:
        return None if value is None else schedules.check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone_is_known(cls, value: str | None) -> str | None:
        return None if value is None else schedules.check_timezone(value)


class ScheduleView(BaseModel):
    """A schedule, as every schedule route answers it."""

    id: str
    name: str | None
    type: str
    job: dict[str, Any] = Field(description="The job body submitted at each tick.")
    cron: str | None
    every: int | None
    timezone: str | None = Field(description="With `cron`: the timezone it is read in; null with `every`.")
    paused: bool
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    next_run_at: str | None = Field(
        description="The next tick (UTC); null while paused.", json_schema_extra={"format": "date-time"}
    )
    last_run_at: str | None = Field(description="When the latest tick's job was enqueued.")
    last_job_id: str | None = Field(description="That job's id.")
    runs: int = Field(ge=0, description="Ticks that enqueued a job.")
    refused: int = Field(
        ge=0, description="Ticks refused: the key's share was full, or the body was no longer valid."
    )
    last_error: dict[str, Any] | None = Field(
        description="The latest refused tick: `{code, message, at}` (`quota_exceeded`, `validation_failed`…)."
    )


class ScheduleList(BaseModel):
    schedules: list[ScheduleView]


class ScheduleDeleted(BaseModel):
    id: str
    deleted: bool


@bp.post("/schedules")
@acknowledges_writes
def create_schedule() -> Response:
    state = get_state()
    body = validate(ScheduleBody, read_json_object(), context={"job_types": state.job_types})
    if body.cron is not None and body.every is not None:
        raise _invalid("every", "give cron or every, not both")
    if body.cron is None and body.every is None:
        raise _invalid("cron", "give cron (an expression) or every (seconds)")
    if body.every is not None and body.timezone is not None:
        raise _invalid("timezone", "timezone goes with cron; every counts seconds, in no timezone")
    owner = current_owner()
    try:  # the job body, as POST /jobs/<type> would validate it; nothing is written
        prepare(state.settings, state.queues, body.type, state.job_types[body.type], body.job, owner)
    except ApiError as error:
        raise _in_job(error) from None
    timing = Timing(cron=body.cron, every=body.every, timezone=body.timezone or DEFAULT_TIMEZONE)
    now = time.time()
    try:
        timing.check(now)
    except ValueError as error:
        raise _invalid("cron", str(error)) from None
    schedule = Schedule(
        id=schedules.new_id(),
        owner=owner,
        type=body.type,
        job=body.job,
        timing=timing,
        created_at=round(now, 3),
        next_run_at=None if body.paused else timing.first_after(now),
        name=body.name,
        paused=body.paused,
    )
    try:
        schedules.create(state.redis, schedule, state.settings.key_max_schedules)
    except TooManySchedules as error:
        raise ApiError(
            429,
            f"This API key already has {error.count} schedules; the limit is {error.cap}. "
            "Delete one to make room.",
            code="quota_exceeded",
            details={"schedules": error.count, "max_schedules": error.cap},
        ) from None
    log.info("schedule %s created: %s %s", schedule.id, body.type, body.cron or f"every {body.every} s")
    response = jsonify(schedule.view())
    response.status_code = 201
    response.headers["Location"] = url_for("schedules.read_schedule", schedule_id=schedule.id)
    return response


@bp.get("/schedules")
def list_schedules() -> Response:
    found = schedules.owned_by(get_state().redis, current_owner())
    return jsonify(schedules=[schedule.view() for schedule in found])


@bp.get("/schedules/<schedule_id>")
def read_schedule(schedule_id: str) -> Response:
    with _found():
        return jsonify(schedules.load(get_state().redis, schedule_id, current_owner()).view())


@bp.post("/schedules/<schedule_id>/pause")
@acknowledges_writes
def pause_schedule(schedule_id: str) -> Response:
    with _found():
        return jsonify(schedules.pause(get_state().redis, schedule_id, current_owner()).view())


@bp.post("/schedules/<schedule_id>/resume")
@acknowledges_writes
def resume_schedule(schedule_id: str) -> Response:
    with _found():
        return jsonify(schedules.resume(get_state().redis, schedule_id, current_owner(), time.time()).view())


@bp.delete("/schedules/<schedule_id>")
@acknowledges_writes
def delete_schedule(schedule_id: str) -> Response:
    with _found():
        schedules.delete(get_state().redis, schedule_id, current_owner())
    log.info("schedule %s deleted", schedule_id)
    return jsonify(id=schedule_id, deleted=True)


@contextmanager
def _found() -> Iterator[None]:
    """NoSuchSchedule becomes the API's 404: an unknown id and another key's alike."""
    try:
        yield
    except NoSuchSchedule:
        raise ApiError(404, "No such schedule.") from None


def _invalid(field: str, message: str) -> ApiError:
    detail = {"field": field, "message": message, "type": "value_error"}
    return ApiError(422, "The request has invalid fields.", details=[detail])


def _in_job(error: ApiError) -> ApiError:
    """The job body's refusal, its fields named as in this body (`job.message`)."""
    details = error.details
    if isinstance(details, list):
        details = [
            {**item, "field": ".".join(part for part in ("job", item.get("field", "")) if part)}
            if isinstance(item, dict)
            else item
            for item in details
        ]
    return ApiError(error.status, error.message, code=error.code, details=details, headers=error.headers)
