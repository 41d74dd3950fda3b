"""Times as Afterward shows and stores them: timezone-aware UTC, ISO 8601 with a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """`2026-11-29T08:00:00.123Z`; naive datetimes are taken as UTC (RQ stores them so)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_timestamp(seconds: float | None) -> str | None:
    """`iso` of a Unix timestamp (RQ scores its scheduled jobs so)."""
    return None if seconds is None else iso(datetime.fromtimestamp(seconds, UTC))


def parse_iso(text: str) -> datetime:
    """The inverse of `iso`, also for RQ's own `...Z` timestamps; always timezone-aware."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)
