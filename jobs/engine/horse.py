"""A work-horse that outlives its job, recycled the way gunicorn and Celery recycle theirs.

RQ forks a new work-horse for every job. Here the worker forks one child and hands it job
after job over a pipe (a `multiprocessing.connection` pair each way: orders in, reports out),
which saves a fork, a new Redis connection and cold caches per job
(BENCHMARKS.md measures it). Between jobs the horse puts back what a job can change in its
process: working directory, environment variables, umask and signal handlers. Everything
else a job leaves behind (module state, caches, memory, open files) the next job in the same
horse would see, so the horse is replaced by a fresh fork of its worker after

- any job that did not succeed: it raised, timed out, was stopped, or its horse died;
- a job that left a thread running;
- a job after which the horse's resident memory is above `HORSE_MAX_RSS_MB`;
- `HORSE_MAX_JOBS` jobs.

The horse stays in its worker's process group, so a process manager's signals reach it, and
the kernel kills it when its worker dies (the parent-death signal), so no job ever runs on
without the worker that answers for it.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe

import psutil

from jobs.sentinel import WATCH_THREAD

PR_SET_PDEATHSIG = 1


@dataclass
class Item:
    """One job of an order: its id, its execution, and its hash as the worker read and started it."""

    job_id: str
    execution_id: str
    execution_created_at: float
    job_hash: dict[bytes, bytes]


@dataclass
class Order:
    """What the worker tells its horse: run these jobs, taken together from this queue.

    The jobs travel with their hashes, so the horse reads nothing back from Redis first.
    """

    queue: str
    items: list[Item]


DONE = b"done"
RETIRING = b"retiring"
# Sent as each job of an order ends, before the order's own DONE or RETIRING.
ENDED = b"ended"


class Horse:
    """The worker's side of a long-lived work-horse process."""

    def __init__(self, run: Callable[[Connection, Connection], None]) -> None:
        orders_read, orders_write = Pipe(duplex=False)
        reports_read, reports_write = Pipe(duplex=False)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the horse
            try:
                die_with_parent(parent)
                orders_write.close()
                reports_read.close()
                run(orders_read, reports_write)
            finally:
                os._exit(0)
        orders_read.close()
        reports_write.close()
        self.pid = pid
        # Closed with this object: a buried horse's pipes go with it.
        self._orders = orders_write
        self._reports = reports_read
        self.exit_status: int | None = None

    def send(self, order: Order) -> bool:
        """False when the horse is gone (it retired or died while idle)."""
        try:
            # The pipe is between this worker and the child it forked alone: pickle is safe.
            self._orders.send(order)
            return True
        except BrokenPipeError:
            return False

    def wait_report(self, timeout: float, wake: int | None = None) -> bytes | None:
        """The horse's next report (`ENDED job-id`, DONE or `RETIRING reason`); b"" when it
        died; None when `timeout` passed or something was written to the `wake` pipe."""
        watched = [self._reports] if wake is None else [self._reports, wake]
        # select rather than multiprocessing.connection.wait, which builds a selector per call.
        ready, _, _ = select.select(watched, [], [], timeout)
        if wake is not None and wake in ready:
            with suppress(BlockingIOError):
                os.read(wake, 4096)
            return None
        if not ready:
            return None
        try:
            return self._reports.recv_bytes()
        except EOFError:
            return b""

    def kill(self) -> None:
        with suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def reap(self) -> int | None:
        """Wait for the process to be gone and return its wait status."""
        if self.exit_status is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.exit_status = status
            except ChildProcessError:
                self.exit_status = 0
        return self.exit_status

    def close(self) -> None:
        """Make sure the horse is gone: an idle horse has nothing to lose."""
        self._orders.close()
        self._reports.close()
        self.kill()
        self.reap()


def die_with_parent(parent: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux); exit if it
    already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def read_orders(orders: Connection) -> Order | None:
    """The horse's side: block for the next order; None when the worker closed the pipe."""
    try:
        return orders.recv()
    except EOFError:
        return None


class ProcessState:
    """What a job may change in its process, captured when the horse starts, put back after each job."""

    def __init__(self) -> None:
        self.cwd = os.getcwd()
        self.environ = dict(os.environ)
        self.umask = os.umask(0)
        os.umask(self.umask)
        self.handlers = {signum: signal.getsignal(signum) for signum in _catchable_signals()}
        self.threads = set(threading.enumerate())

    def restore(self) -> None:
        os.chdir(self.cwd)
        if os.environ != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        os.umask(self.umask)
        for signum, handler in self.handlers.items():
            if handler is not None and signal.getsignal(signum) != handler:
                signal.signal(signum, handler)

    def threads_left(self) -> list[str]:
        """Threads started since the horse started and still running, but the Sentinel watch:
        the horse's Redis client starts it with its first connection, during the first job."""
        return [
            t.name
            for t in threading.enumerate()
            if t not in self.threads and t.is_alive() and t.name != WATCH_THREAD
        ]


def resident_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _catchable_signals() -> list[int]:
    return [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]
