"""A work-horse that outlives its job: one forked child runs job after job for its worker.

RQ forks a new work-horse for every job, which costs a fork, a fresh interpreter state
and cold caches per job (and, for a process holding a model, tens of milliseconds). Here
the worker forks one child and hands it job after job over a pipe. The isolation stays:
the child runs each job under RQ's own timeout, and whenever a job must be stopped — it
crashed, it ignored its timeout, it was canceled, the worker is shutting down — the worker
kills the child and forks a fresh one for the next job.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import BinaryIO


@dataclass
class Order:
    """What the worker tells its horse: run this job, from this queue, as this execution."""

    job_id: str
    queue: str
    execution_id: str
    execution_created_at: float

    def encode(self) -> bytes:
        return f"{self.job_id} {self.queue} {self.execution_id} {self.execution_created_at!r}\n".encode()

    @classmethod
    def decode(cls, line: bytes) -> Order:
        job_id, queue, execution_id, created_at = line.decode().split()
        return cls(job_id, queue, execution_id, float(created_at))


DONE = b"done\n"
RETIRING = b"retiring\n"


class Horse:
    """The worker's side of a long-lived work-horse process."""

    def __init__(self, run: Callable[[int, int], None]) -> None:
        orders_read, orders_write = os.pipe()
        reports_read, reports_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the horse
            os.setpgrp()
            os.close(orders_write)
            os.close(reports_read)
            try:
                run(orders_read, reports_write)
            finally:
                os._exit(0)
        # Its own process group, set from both sides so that a kill sent at once cannot miss.
        with suppress(OSError):
            os.setpgid(pid, pid)
        os.close(orders_read)
        os.close(reports_write)
        self.pid = pid
        self._orders = orders_write
        self._reports = reports_read
        self._buffer = b""
        self.exit_status: int | None = None

    def send(self, order: Order) -> bool:
        """False when the horse is gone (it retired or died while idle)."""
        try:
            os.write(self._orders, order.encode())
            return True
        except BrokenPipeError:
            return False

    def wait_report(self, timeout: float) -> bytes | None:
        """The horse's next report; None on timeout; b"" when it died."""
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._reports], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._reports, 4096)
            if not chunk:
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line + b"\n"

    def reap(self) -> int | None:
        """Wait for the process to be gone and return its wait status."""
        if self.exit_status is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.exit_status = status
            except ChildProcessError:
                self.exit_status = 0
        return self.exit_status

    def close(self, grace: float = 1.0) -> None:
        """Tell an idle horse to leave (end of its orders), and make sure it does."""
        for fd in (self._orders, self._reports):
            try:
                os.close(fd)
            except OSError as error:
                if error.errno != errno.EBADF:
                    raise
        # Another child of the worker (RQ's scheduler) may hold a copy of the pipe, so the
        # horse might never read the end of its orders: it gets a moment, then SIGKILL.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.exit_status = 0
                return
            if pid:
                self.exit_status = status
                return
            time.sleep(0.02)
        with suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.reap()


def read_orders(orders: BinaryIO) -> Order | None:
    """The horse's side: block for the next order; None when the worker closed the pipe."""
    line = orders.readline()
    return Order.decode(line) if line.endswith(b"\n") else None
