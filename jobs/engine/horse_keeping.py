"""The worker's work-horse, kept: forked (jobs.engine.horse holds the process and its pipe),
killed on request, buried when it dies or retires, and, inside the horse, the loop that runs
each order the worker sends until the horse must be replaced. A part of
jobs.engine.worker.Worker, which holds the state these methods use (see its `__init__`);
what an order's jobs do is the Worker's `_run_order`.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Callable
from contextlib import suppress
from multiprocessing.connection import Connection
from typing import Any

from jobs.engine.horse import (
    DONE,
    RETIRING,
    Horse,
    ProcessState,
    read_orders,
    resident_mb,
)

log = logging.getLogger(__name__)


class HorseKeeping:
    """The Worker's work-horse handling (mixed into jobs.engine.worker.Worker)."""

    @property
    def horse_pid(self) -> int:
        return self._horse.pid if self._horse is not None else 0

    def _spawn_horse(self) -> Horse:
        self._horse = Horse(self._horse_main)
        self.procline(f"Horse {self._horse.pid} ready")
        return self._horse

    def _bury_horse(self) -> int | None:
        status = self._horse.reap() if self._horse is not None else None
        self._horse = None
        return status

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """RQ's stop-job, stop-execution and kill-horse commands end here: stop the running job.

        Only the horse is killed: it shares the worker's process group, which RQ's own
        `kill_horse` would signal whole.
        """
        if self._horse is not None:
            self._kill_reason = self._kill_reason or "stopped"
            with suppress(ProcessLookupError):
                os.kill(self._horse.pid, sig)

    def wait_for_horse(self) -> tuple[int | None, int | None, Any]:
        status = self._bury_horse()
        return None, status, None

    def _horse_main(self, orders: Connection, reports: Connection) -> None:
        """The horse: run each order it is sent and report; retire when it must be replaced."""
        random.seed()
        self._in_horse = True
        self._outage.muted = True  # the worker says when Redis is away, once
        self._reports = reports
        signal.set_wakeup_fd(-1)  # the worker's wake-up pipe is the worker's
        self.setup_work_horse_signals()
        self.horse_started()
        state = ProcessState()
        done = 0
        while (order := read_orders(orders)) is not None:
            try:
                succeeded = self._run_order(order)
            except BaseException:
                log.exception("work-horse failed outside its job")
                os._exit(1)
            done += len(order.items)
            state.restore()
            reason = self._retire_reason(succeeded, state, done)
            reports.send_bytes(DONE if reason is None else RETIRING + f" {reason}".encode())
            if reason is not None:
                return

    def _retire_reason(self, succeeded: bool, state: ProcessState, done: int) -> str | None:
        if not succeeded:
            return "its job did not succeed"
        threads = state.threads_left()
        if threads:
            return f"its job left threads running: {', '.join(threads)}"
        cap = self.settings.horse_max_rss_mb
        if cap and (rss := resident_mb()) > cap:
            return f"{rss:.0f} MB resident, above HORSE_MAX_RSS_MB={cap}"
        if done >= self.settings.horse_max_jobs:
            return f"it ran HORSE_MAX_JOBS={self.settings.horse_max_jobs} jobs"
        return None

    def horse_started(self) -> None:
        """Called in a new work-horse before its first job (load what its jobs need here)."""

    def setup_work_horse_signals(self) -> None:
        # When a job must stop is the worker's decision: SIGTERM and SIGINT sent to the whole
        # process group (a platform's stop, Ctrl-C) are for the worker. A handler that does
        # nothing, not SIG_IGN, so that processes a job starts get the defaults back on exec.
        signal.signal(signal.SIGINT, _for_the_worker)
        signal.signal(signal.SIGTERM, _for_the_worker)


_for_the_worker: Callable[[int, Any], None] = lambda signum, frame: None  # noqa: E731
