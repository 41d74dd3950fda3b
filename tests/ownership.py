"""The test suite owns what it starts: every such process dies with it, whatever happens.

Each run marks its environment with a token that every process it starts inherits (Redis,
gunicorn, `rq` workers, their work-horses, Chromium, benchmark scripts), and each `Process`
(scripts.processes) adds a tag of its own and kills its whole tree when it stops. pytest
becomes a child subreaper, so orphans come back to it rather than to init.

At the end of the session anything still carrying the run's token is killed and the run
fails, naming it. SIGTERM and SIGINT unwind the session the same way (a second signal kills
everything at once), and processes left by an earlier run of the same checkout that could
not clean up (it was SIGKILLed) are killed when the next run starts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import uuid
from contextlib import suppress
from pathlib import Path

import psutil

from scripts.processes import RUN_VAR, TAG_VAR, is_live, kill, marked, tagged

ROOT_VAR = "AFTERWARD_TEST_ROOT"  # the checkout a test run belongs to

PR_SET_CHILD_SUBREAPER = 36

__all__ = ["RUN_VAR", "TAG_VAR", "begin", "describe", "kill", "leftovers", "reap_orphans", "tagged"]


def begin(root: Path) -> str:
    """Mark this run's environment, adopt orphans, and kill what a dead earlier run left."""
    token = f"{os.getpid()}:{psutil.Process().create_time()}:{uuid.uuid4().hex}"
    os.environ[RUN_VAR] = token
    os.environ[ROOT_VAR] = str(root)
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    stale = [p for p in marked(lambda env: env.get(ROOT_VAR) == str(root)) if not _alive_run(p[1][RUN_VAR])]
    if stale:
        print(f"\nkilling {len(stale)} process(es) left by an earlier test run of this checkout", flush=True)
        kill([process for process, _ in stale])
    return token


def leftovers(grace: float = 0) -> list[psutil.Process]:
    """Live processes this run started, other than pytest itself, after `grace` seconds to exit."""
    found = _leftovers()
    if found and grace:
        # Processes on their way out (xdist workers after their last test) get a moment.
        psutil.wait_procs(found, timeout=grace)
        found = _leftovers()
    return found


def _leftovers() -> list[psutil.Process]:
    token = os.environ.get(RUN_VAR)
    found = [process for process, _ in marked(lambda env: env.get(RUN_VAR) == token)]
    with suppress(psutil.Error):
        found += [c for c in psutil.Process().children(recursive=True) if c not in found and is_live(c)]
    return [p for p in found if not _is_ours(p)]


def reap_orphans() -> None:
    """Collect orphans that came back to us and ended on their own."""
    with suppress(psutil.Error):
        for child in psutil.Process().children():
            with suppress(psutil.Error, ChildProcessError):
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)


def describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid}: {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {process.pid}"


def install_signal_handlers() -> None:
    """SIGTERM unwinds the session like Ctrl-C; a second signal kills everything at once."""
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            kill(leftovers())
            os._exit(128 + signum)
        received.append(signum)
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def _alive_run(token: str) -> bool:
    """True while the pytest process that made `token` runs (same pid, same start time)."""
    pid, _, created = token.partition(":")
    try:
        return psutil.Process(int(pid)).create_time() == float(created.partition(":")[0])
    except (psutil.Error, ValueError):
        return False


def _is_ours(process: psutil.Process) -> bool:
    """pytest itself, or a process above it (make, the shell)."""
    try:
        return process.pid == os.getpid() or process in psutil.Process().parents()
    except psutil.Error:
        return True
