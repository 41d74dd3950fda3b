"""Processes started for tests and benchmarks, and everything they start, killed as one.

Each `Process` runs a command in a process group of its own and marks its environment with a
tag that every descendant inherits. Stopping it kills its group, its tree, and anything else
carrying the tag: children that left the group (RQ's work-horses did) or were orphaned when
their parent was killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any, ClassVar

import psutil
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent

RUN_VAR = "AFTERWARD_TEST_RUN"  # "<pytest pid>:<its start time>:<random>": which test run started it
TAG_VAR = "AFTERWARD_TEST_PROCESS"  # which `Process` started it

# The longest a wait lasts for something that should happen (a process to answer, a job to
# end) before it counts as a failure. Waits return as soon as their condition holds, so only
# a failure pays for a generous deadline; a busy machine needs one. TEST_DEADLINE sets it.
DEADLINE = float(os.environ.get("TEST_DEADLINE") or 120)


class Process:
    """A command in its own process group; stopping it kills all it started.

    A child may leave the group, or be orphaned when a test kills its parent, so a tag in
    the environment finds every descendant, wherever it went.
    """

    # Every process started in this process, oldest first: a failed test's report shows the
    # end of the logs of those it started (tests/conftest.py).
    started: ClassVar[list[Process]] = []

    def __init__(
        self, name: str, command: str, env: dict[str, str], log_path: Path, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.tag = f"{name}-{uuid.uuid4().hex[:12]}"
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=cwd,
            env={**env, TAG_VAR: self.tag},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        Process.started.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to the group, as a platform stops a process; SIGKILL for what remains."""
        try:
            self.signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL everything at once: for clean-up, where a graceful stop only costs time."""
        with suppress(psutil.Error):
            kill([psutil.Process(self.popen.pid)])
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        kill(tagged(self.tag))
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes started by the `Process` with this tag, wherever they are now."""
    return [process for process, _ in marked(lambda env: env.get(TAG_VAR) == tag)]


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


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = DEADLINE,
    what: str = "condition",
    process: Process | None = None,
) -> Any:
    """Poll `predicate` until it returns something true, and return that.

    A failure to reach Redis or a server counts as "not yet"; on timeout the error names
    the last such failure and shows the end of the process's log.
    """
    deadline = time.monotonic() + timeout
    failure: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (requests.RequestException, redis.RedisError, OSError) as error:
            failure, value = error, None
        if value:
            return value
        if process is not None and not process.alive():
            raise AssertionError(
                f"{process.name} exited while waiting for {what}:\n{process.output()[-3000:]}"
            )
        time.sleep(0.05)
    last = f" (last error: {failure!r})" if failure else ""
    tail = f"\n{process.name} output:\n{process.output()[-3000:]}" if process is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{last}{tail}")


def marked(match: Callable[[dict[str, str]], bool]) -> list[tuple[psutil.Process, dict[str, str]]]:
    me = os.getpid()
    found = []
    for process in psutil.process_iter():
        if process.pid == me:
            continue
        try:
            environ = process.environ()
        except (psutil.Error, OSError):
            continue  # gone, or another user's
        if (RUN_VAR in environ or TAG_VAR in environ) and match(environ) and is_live(process):
            found.append((process, environ))
    return found


def is_live(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
