"""Queue families: each family of job types has RQ queues, and a process type, of its own.

General jobs (`log`, `sleep`) run on `high`, `default` and `low`, served by the Procfile's
`worker` processes; embedding jobs on `embed-high`, `embed-default` and `embed-low`, served
by `embedder` processes, whose work-horses hold the model.
"""

from __future__ import annotations

PRIORITIES = ("high", "default", "low")
"""The `queue` a client picks, in the order workers take jobs."""

GENERAL = ""
EMBED = "embed"


def queue_name(family: str, priority: str) -> str:
    """The RQ queue of a job type family and priority: `high`, or `embed-high` for embeddings."""
    return f"{family}-{priority}" if family else priority


def family_queues(family: str) -> list[str]:
    """A family's RQ queues in the order its workers take jobs."""
    return [queue_name(family, priority) for priority in PRIORITIES]
