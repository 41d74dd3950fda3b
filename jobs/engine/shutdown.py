"""Stopping: a worker asked to stop (SIGTERM, SIGINT) gives its running job `SHUTDOWN_GRACE`
seconds, then puts it back at the front of its queue; a job asked to stop (RQ's stop-job
command) is stopped alone; and the worker's threads and horse end with it. A part of
jobs.engine.worker.Worker, which holds the state these methods use (see its `__init__`);
the job put back is the Worker's `_put_back`.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import suppress
from typing import Any

import redis
from rq.command import parse_payload

from jobs.engine.queue import STOPPING
from jobs.times import now

log = logging.getLogger(__name__)


class Shutdown:
    """The Worker's stop handling (mixed into jobs.engine.worker.Worker)."""

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: a warm stop. The running job gets `SHUTDOWN_GRACE` seconds, then is
        put back (_enforce_limits); an idle worker stops at its next look at its queues.

        A handler runs wherever the main thread happens to be, even inside another run of
        itself: a platform's SIGTERM and the pool's SIGINT arrive together. So it only sets
        flags (no lock, no Redis call, no logging); the main thread does the rest (_stopping).
        """
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)
        if self._shutdown_deadline is None:
            self._shutdown_deadline = time.monotonic() + self.settings.shutdown_grace
            self._shutdown_requested_date = now()
        # Look at the running job every second until it ends or the grace runs out.
        self.job_monitoring_interval = 1
        # RQ's work loop ends after the running job; a waiting dequeue returns no job.
        self._stop_requested = True
        STOPPING.set()

    def request_force_stop(self, signum: int, frame: Any) -> None:
        # Further signals neither cut a job's grace period short nor break off the worker's
        # clean exit. When the grace period is over the running job is stopped and put back.
        pass

    def _stopping(self) -> None:
        """The main thread's part of a stop request: say so, in the log and in Redis, once."""
        if self._shutdown_deadline is None or self._stop_announced:
            return
        self._stop_announced = True
        grace = self.settings.shutdown_grace
        log.info("worker %s: stopping; a running job gets %s s to finish", self.name, grace)
        with suppress(redis.exceptions.RedisError):
            self.set_shutdown_requested_date()
        if self.scheduler:
            self.stop_scheduler()

    def _next_look(self) -> float:
        """Seconds until the next look at the running jobs: the monitoring interval, but no
        later than the end of a shutdown grace (a runner kills what is still there soon after)."""
        if self._shutdown_deadline is None or self._kill_reason is not None:
            return self.job_monitoring_interval
        return max(0.0, min(self.job_monitoring_interval, self._shutdown_deadline - time.monotonic()))

    def handle_payload(self, message: Any) -> None:
        # RQ's stop-job command stops only the job `get_current_job_id` names: here, any of
        # the jobs the horse runs (the others of its batch are put back, untouched).
        payload = parse_payload(message)
        job_id = payload.get("job_id")
        if payload.get("command") == "stop-job" and job_id in self._running_ids:
            log.info("stopping job %s on request", job_id)
            self._stopped_job_id = job_id
            self.kill_horse()
            return
        super().handle_payload(message)

    def teardown(self) -> None:
        if not self._in_horse:
            self._stopping()
            if self._webhook_sender is not None:
                self._webhook_sender.stop()
                self._webhook_sender = None
            if self._probe is not None:
                self._probe.stop()
                self._probe = None
            if self._ticker is not None:
                self._ticker.stop()
                self._ticker = None
            if self._horse is not None:
                self._horse.close()
                self._horse = None
            if self.pubsub_thread is not None:
                # Told to stop before RQ unsubscribes, RQ's listener ends on the reply; told
                # after, it may have taken the reply already and wait for a new subscription,
                # and RQ waits a second for it while the runner's time to kill runs out.
                self.pubsub_thread.stop()
        super().teardown()
