"""Long-polling support: wake waiting requests when their job ends.

Workers publish a job's id on `JOB_EVENTS_CHANNEL` when it ends. One listener thread per
web process subscribes to it and wakes the requests waiting on that id, so a waiting
request costs a thread and no Redis traffic beyond a fallback re-read once a second
(in case an event is missed while the listener reconnects).

A web process holds at most `slots` waiting requests; the others are answered at once
with the job's current state, so long polls can never take every thread of a process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import redis

from jobs import keys

log = logging.getLogger(__name__)

# Longest pause between two reads of a job while waiting, in case an event was missed.
FALLBACK_POLL_SECONDS = 1.0


class JobWaiter:
    def __init__(self, connection: redis.Redis, slots: int) -> None:
        self._connection = connection
        self._slots = threading.BoundedSemaphore(slots) if slots > 0 else None
        self._lock = threading.Lock()
        self._waiting: dict[str, set[threading.Event]] = {}
        self._listener: threading.Thread | None = None

    @contextmanager
    def slot(self) -> Iterator[bool]:
        """Yield True when this request may wait; False when all slots are taken."""
        if self._slots is None or not self._slots.acquire(blocking=False):
            yield False
            return
        try:
            yield True
        finally:
            self._slots.release()

    @contextmanager
    def watch(self, job_id: str) -> Iterator[threading.Event]:
        """An event set whenever `job_id` is announced; register before reading the job."""
        self._ensure_listener()
        event = threading.Event()
        with self._lock:
            self._waiting.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._waiting.get(job_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiting[job_id]

    def notify(self, job_id: str) -> None:
        with self._lock:
            events = list(self._waiting.get(job_id, ()))
        for event in events:
            event.set()

    def _ensure_listener(self) -> None:
        if self._listener is not None and self._listener.is_alive():
            return
        with self._lock:
            if self._listener is None or not self._listener.is_alive():
                self._listener = threading.Thread(target=self._listen, name="job-events", daemon=True)
                self._listener.start()

    def _listen(self) -> None:
        backoff = 0.5
        while True:
            pubsub = self._connection.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.JOB_EVENTS_CHANNEL)
                backoff = 0.5
                while True:
                    message = pubsub.get_message(timeout=FALLBACK_POLL_SECONDS)
                    if message and message.get("type") == "message":
                        data = message["data"]
                        self.notify(data.decode() if isinstance(data, bytes) else str(data))
            except redis.exceptions.RedisError as error:
                log.warning("job events listener lost Redis (%s); reconnecting", error)
                # Wake everyone: they re-read their job and find out for themselves.
                with self._lock:
                    events = [event for group in self._waiting.values() for event in group]
                for event in events:
                    event.set()
                threading.Event().wait(backoff)
                backoff = min(backoff * 2, 10)
            finally:
                with suppress(Exception):
                    pubsub.close()
