"""The test suite owns what it starts: every such process dies with it, whatever happens.

Each run marks its environment with a token that every process it starts inherits (Redis,
gunicorn, `rq` workers, their work-horses, Chromium, benchmark scripts). Each `Process` adds
a tag of its own, so stopping it also finds descendants that left its process group (RQ's
work-horses do) or were orphaned when a test killed their parent. pytest becomes a child
subreaper, so such orphans come back to it rather than to init.

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
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

import psutil

RUN_VAR = "AFTERWARD_TEST_RUN"  # "<pytest pid>:<its start time>:<random>": which run started a process
ROOT_VAR = "AFTERWARD_TEST_ROOT"  # the checkout that run belongs to
TAG_VAR = "AFTERWARD_TEST_PROCESS"  # which `Process` started it

PR_SET_CHILD_SUBREAPER = 36


def begin(root: Path) -> str:
    """Mark this run's environment, adopt orphans, and kill what a dead earlier run left."""
    token = f"{os.getpid()}:{psutil.Process().create_time()}:{uuid.uuid4().hex}"
    os.environ[RUN_VAR] = token
    os.environ[ROOT_VAR] = str(root)
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    stale = [p for p in _marked(lambda env: env.get(ROOT_VAR) == str(root)) if not _alive_run(p[1][RUN_VAR])]
    if stale:
        print(f"\nkilling {len(stale)} process(es) left by an earlier test run of this checkout", flush=True)
        kill([process for process, _ in stale])
    return token


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes started by the `Process` with this tag, wherever they are now."""
    return [process for process, _ in _marked(lambda env: env.get(TAG_VAR) == tag)]


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
    found = [process for process, _ in _marked(lambda env: env.get(RUN_VAR) == token)]
    with suppress(psutil.Error):
        found += [c for c in psutil.Process().children(recursive=True) if c not in found and _is_live(c)]
    return [p for p in found if not _is_ours(p)]


def kill(processes: Iterable[psutil.Process]) -> None:
    """SIGKILL each process with everything below it, and reap those that are our children."""
    victims: list[psutil.Process] = []
    for process in processes:
        with suppress(psutil.Error):
            victims += [process, *process.children(recursive=True)]
    for process in victims:
        with suppress(psutil.Error):
            process.kill()
    # A killed process is gone at once; only our own children (orphans that came back to us
    # included) must be waited for, or they linger as zombies.
    me = os.getpid()
    children = []
    for process in victims:
        with suppress(psutil.Error):
            if process.ppid() == me:
                children.append(process)
    psutil.wait_procs(children, timeout=5)


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


# ---------------------------------------------------------------- reading the process table


def _marked(match) -> list[tuple[psutil.Process, dict[str, str]]]:
    me = os.getpid()
    found = []
    for process in psutil.process_iter():
        if process.pid == me:
            continue
        try:
            environ = process.environ()
        except (psutil.Error, OSError):
            continue  # gone, or another user's
        if (RUN_VAR in environ or TAG_VAR in environ) and match(environ) and _is_live(process):
            found.append((process, environ))
    return found


def _is_live(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
