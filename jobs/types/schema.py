"""Input schemas: the base every job type's input extends, and the options common to all jobs."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, model_validator

from jobs.settings import Settings, get_settings

# The `queue` a client picks (jobs.families.PRIORITIES).
Queue = Literal["high", "default", "low"]

MAX_RETRIES = 10
# Most jobs one job may depend on.
MAX_DEPENDENCIES = 100


class JobInput(BaseModel):
    """Base of every job type's input: strict types, unknown fields rejected."""

    # strict: `true` is not a number and "5" is not an integer.
    model_config = ConfigDict(strict=True, extra="forbid")


class JobOptions(JobInput):
    """Fields every job accepts besides its own."""

    queue: Queue = Field(default="default", description="Queue to run on; `high` is taken first.")
    timeout: int | None = Field(
        default=None, ge=1, description="Seconds the job may run before it is stopped."
    )
    retries: int = Field(
        default=0,
        ge=0,
        le=MAX_RETRIES,
        description="How many times a failed attempt is retried, each after a longer wait.",
    )
    delay: float = Field(
        default=0, ge=0, description="Seconds to wait before the job may run (it is `scheduled` until then)."
    )
    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description=(
            "An http(s) URL the job view is POSTed to, signed, when the job ends (finished, failed, "
            "stopped or canceled); needs CALLBACK_SECRET on the server. See the README, webhooks."
        ),
    )
    depends_on: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_DEPENDENCIES,
        description=(
            f"Ids of up to {MAX_DEPENDENCIES} of the caller's own jobs this one waits for: it is "
            "`deferred` until they have all finished, and ends `canceled` (error `DependencyFailed`) "
            "if one fails, is stopped or canceled. A repeated id counts once."
        ),
        json_schema_extra={"examples": [["4f9c2a1e8b7d4c3a9e6f1b2d3c4a5e6f"]]},
    )
    allow_failure: bool = Field(
        default=False,
        description="With `depends_on`: run once every dependency has ended, whether it finished or not.",
    )

    @model_validator(mode="after")
    def _dependencies_not_delayed(self) -> JobOptions:
        if self.depends_on and self.delay:
            raise ValueError("a job with depends_on cannot also have a delay")
        return self


OPTION_FIELDS = frozenset(JobOptions.model_fields)


def within(text: str, limit: int, name: str, blank_ok: bool = True) -> str:
    """A text field's configurable checks: at most `limit` characters, and not blank unless allowed."""
    if not blank_ok and not text.strip():
        raise ValueError(f"{name} is blank")
    if len(text) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")
    return text


def limits(info: ValidationInfo) -> Settings:
    """The settings whose limits a validator enforces: those the request is validated with."""
    context = info.context or {}
    return context.get("settings") or get_settings()


@lru_cache(maxsize=16)
def options_model(max_timeout: int, max_delay: int) -> type[JobOptions]:
    """JobOptions with the configured upper bounds on `timeout` and `delay`."""
    return create_model(
        "JobOptions",
        __base__=JobOptions,
        timeout=(int | None, Field(default=None, ge=1, le=max_timeout, description=_doc("timeout"))),
        delay=(float, Field(default=0, ge=0, le=max_delay, description=_doc("delay"))),
    )


def _doc(name: str) -> str | None:
    return JobOptions.model_fields[name].description
