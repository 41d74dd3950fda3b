"""Delivering completion webhooks: the `WebhookSender` each worker process runs beside its
work loop (see jobs.callbacks for when a callback is due, how it is signed and which
addresses it may reach)."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import redis
import urllib3
from rq.results import Result

from jobs import batches, keys
from jobs.callbacks import (
    CALLBACK_FIELD,
    RECHECK_MAX,
    RECHECK_MIN,
    Allowed,
    CallbackRefused,
    key_secret,
    parse_url,
    resolve,
    signature,
)
from jobs.deliveries import BATCH_ENTRY, DELIVERED, FAILED, FINAL, REFUSED, RETRYING, TAKE, initial_state
from jobs.engine.job import Job
from jobs.settings import Settings
from jobs.times import iso, now, parse_iso
from jobs.view import is_terminal, job_view

log = logging.getLogger(__name__)

# Seconds a webhook sender holds an entry while it delivers; longer than any one attempt.
LEASE = 120
# Seconds between a sender's looks at the due entries when nothing wakes it (a published end
# wakes every sender at once; this is for ends published while a sender was not listening).
POLL = 1.0
# Seconds between a webhook sender's attempts to reach Redis again.
RECONNECT = 5.0
# An entry announced due whose job does not look ended yet (RQ records an abandoned job's
# failure after telling its exception handlers, which announce it) is looked at again this soon.
ANNOUNCED_RECHECK = 0.5
# First retry after this many seconds, doubling, at most MAX_BACKOFF.
BACKOFF, MAX_BACKOFF = 1, 600
# Bytes of a receiver's answer that are read (and dropped).
MAX_ANSWER_BYTES = 64 * 1024

# Record a delivery's state on the job, if the job still exists, and reschedule (ARGV[3]) or
# drop (ARGV[3] == '') its entry.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if ARGV[3] == '' then redis.call('ZREM', KEYS[2], ARGV[4])
else redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4]) end
"""


class WebhookSender:
    """Delivers due callbacks from one process, on `CALLBACK_CONCURRENCY` threads."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.allowed = Allowed.parse(settings.callback_allowed_hosts)
        self._take = connection.register_script(TAKE)
        self._record = connection.register_script(_RECORD)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.concurrency = max(1, settings.callback_concurrency)
        self._busy = threading.Semaphore(self.concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="callback")
        self._thread = threading.Thread(target=self._loop, name="callback-sender", daemon=True)
        self._thread.start()
        self._listener = threading.Thread(target=self._listen, name="callback-listener", daemon=True)
        self._listener.start()

    def stop(self, wait: float = 2.0) -> None:
        """Stop taking entries; deliveries under way get `wait` seconds (a lease covers the rest)."""
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._listener):
            if thread is not None:
                thread.join(wait)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                taken = self.take_due()
            except redis.RedisError:  # the worker says so (jobs.connection.Outage)
                self._stop.wait(RECONNECT)
                continue
            except Exception:  # a webhook sender that stopped would leave deliveries to the others
                log.exception("callbacks: could not take due entries")
                self._stop.wait(POLL)
                continue
            if not taken:
                self._wake.wait(POLL)
                self._wake.clear()

    def _listen(self) -> None:
        """Wake the webhook sender whenever any process announces an end (due)."""
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(keys.CALLBACKS_CHANNEL)
                    self._wake.set()  # what was announced before it listened
                # A fifth of a second: a stopping worker waits for this thread to see it.
                if pubsub.get_message(timeout=0.2) is not None:
                    self._wake.set()
            except redis.RedisError:  # the loop polls meanwhile; the worker reports the outage
                if pubsub is not None:
                    with suppress(redis.RedisError):
                        pubsub.close()
                pubsub = None
                self._stop.wait(RECONNECT)
        if pubsub is not None:
            with suppress(redis.RedisError):
                pubsub.close()

    def take_due(self) -> int:
        """Start delivering what is due, as many as there are free threads; how many were taken."""
        free = 0
        while self._busy.acquire(blocking=False):
            free += 1
        if not free:  # every thread is busy: the loop waits for one to finish (it wakes it)
            return 0
        at = time.time()
        try:
            found = self._take(keys=[keys.CALLBACKS], args=[at, at + LEASE, free])
        except BaseException:
            for _ in range(free):
                self._busy.release()
            raise
        taken = [(found[i].decode(), float(found[i + 1]) == 0) for i in range(0, len(found), 2)]
        for _ in range(free - len(taken)):
            self._busy.release()
        for job_id, announced in taken:
            self._pool.submit(self._deliver_one, job_id, announced)
        return len(taken)

    def _deliver_one(self, job_id: str, announced: bool) -> None:
        try:
            self.deliver(job_id, announced)
        except Exception:  # the lease brings it back
            log.exception("callback of job %s: delivery broke off", job_id)
        finally:
            self._busy.release()
            self._wake.set()

    def deliver(self, job_id: str, announced: bool = False) -> None:
        """Look at one leased entry: deliver the job's end, or look again later.

        `announced`: the entry was due because the job's end was announced (`due`).
        """
        if job_id.startswith(BATCH_ENTRY):  # a batch's end (jobs.batches)
            self.deliver_batch(job_id.removeprefix(BATCH_ENTRY))
            return
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hgetall(Job.key_for(job_id))
            pipe.xrevrange(Result.get_key(job_id), "+", "-", count=1)
            fields, latest = pipe.execute()
        if not fields:  # expired or deleted: nothing to tell anyone
            self.connection.zrem(keys.CALLBACKS, job_id)
            return
        job = Job(job_id, connection=self.connection)
        job.restore(fields)
        state = job.callback
        if state is None:
            self.connection.zrem(keys.CALLBACKS, job_id)
            return
        if not is_terminal(job):
            age = time.time() - job.created_at.timestamp() if job.created_at else RECHECK_MIN
            # Announced but not recorded yet: the end is on its way, look again in a moment
            # (once; then as any running job).
            wait = ANNOUNCED_RECHECK if announced else min(max(age, RECHECK_MIN), RECHECK_MAX)
            # Only ever brought forward: a job that ended while this sender looked at it keeps
            # the "due now" its end gave it. Its state is unchanged: nothing to write.
            self.connection.zadd(keys.CALLBACKS, {job_id: time.time() + wait}, lt=True)
            return
        end = _end_of(job)
        if state["status"] in FINAL and state.get("end") == end:
            self.connection.zrem(keys.CALLBACKS, job_id)
            return
        if state.get("end") != end:  # a new end (the job ran again): counted afresh
            state.update(initial_state(state["url"]), end=end)
        state["attempts"] += 1
        result = None
        if latest:
            result_id, payload = latest[0]
            result = Result.restore(
                job_id, result_id.decode(), payload, self.connection, serializer=job.serializer
            )
        body = json.dumps(job_view(job, result), separators=(",", ":")).encode()
        ended = job.ended_at.timestamp() if job.ended_at else time.time()
        event = f"job.{job.get_status(refresh=False).value}"
        # Every job has the owner it was submitted by (`public` while the API is open).
        owner = job.meta.get("owner") or "public"
        next_at = self.attempt(
            state, body, event, f"{job.id}.{end}", owner, ended, what=f"callback of job {job_id}"
        )
        self._save(job, state, next_at)

    def deliver_batch(self, batch_id: str) -> None:
        """Deliver the end of a batch (a leased CALLBACKS entry), or look again later."""
        connection = self.connection
        view = batches.read(connection, batch_id)
        state = view and view["_callback"]
        entry = batches.entry(batch_id)
        if not view or state is None or not view["done"] or state["status"] in FINAL:
            connection.zrem(keys.CALLBACKS, entry)
            return
        ended = parse_iso(view["ended_at"]).timestamp()
        if not view["_settled"] and time.time() < ended + batches.SETTLE:
            connection.zadd(keys.CALLBACKS, {entry: time.time() + batches.SETTLE_RECHECK})
            return
        state["attempts"] += 1
        body = json.dumps(batches.public(view), separators=(",", ":")).encode()
        next_at = self.attempt(
            state,
            body,
            "batch.ended",
            f"{batch_id}.ended",
            view["owner"],
            ended,
            what=f"callback of batch {batch_id}",
        )
        self.record(keys.batch(batch_id), "callback", state, next_at, entry)

    def attempt(
        self,
        state: dict[str, Any],
        body: bytes,
        event: str,
        delivery: str,
        owner: str,
        ended: float,
        what: str,
    ) -> float | None:
        """One delivery attempt of `body` to `state["url"]`, its outcome recorded in `state`;
        when to try again (None: delivered, refused or given up). `ended`: when the end being
        delivered happened (retries stop CALLBACK_RETRY_FOR seconds after it)."""
        try:
            self.send(state["url"], body, event, delivery, owner)
        except CallbackRefused as error:
            state.update(status=REFUSED, last_error=str(error))
            log.warning("%s refused: %s (%s)", what, error, error.address or "")
            return None
        except _Undelivered as error:
            state["last_error"] = str(error)
            wait = _backoff(state["attempts"])
            if time.time() + wait > ended + self.settings.callback_retry_for:
                state["status"] = FAILED
                log.warning("%s failed for good after %d attempts: %s", what, state["attempts"], error)
                return None
            state["status"] = RETRYING
            log.info("%s: %s; attempt %d again in %.0f s", what, error, state["attempts"] + 1, wait)
            return time.time() + wait
        state.update(status=DELIVERED, last_error=None, delivered_at=iso(now()))
        log.info("%s delivered (%s)", what, event)
        return None

    def post(self, url: str, body: bytes, job: Job, end: str) -> None:
        """One delivery attempt of the end `end` of `job`: CallbackRefused, _Undelivered, or
        delivered (2xx)."""
        event = f"job.{job.get_status(refresh=False).value}"
        # Every job has the owner it was submitted by (`public` while the API is open).
        self.send(url, body, event, f"{job.id}.{end}", job.meta.get("owner") or "public")

    def send(self, url: str, body: bytes, event: str, delivery: str, owner: str) -> None:
        """One delivery attempt, signed with `owner`'s secret: CallbackRefused, _Undelivered, or
        delivered (2xx)."""
        target = parse_url(url)
        try:
            address = resolve(target, self.allowed)
        except OSError as error:
            raise _Undelivered(f"cannot resolve {target.host}: {error.strerror or error}") from None
        timestamp = str(int(time.time()))
        secret = key_secret(self.settings.callback_secret, owner)
        headers = {
            "Host": target.host_header,
            "Content-Type": "application/json",
            "User-Agent": "Afterward-Webhook/1",
            "Afterward-Event": event,
            "Afterward-Delivery": delivery,
            "Afterward-Timestamp": timestamp,
            "Afterward-Signature": signature(secret, timestamp, delivery, event, body),
        }
        timeout = urllib3.Timeout(
            connect=min(5, self.settings.callback_timeout), read=self.settings.callback_timeout
        )
        if target.scheme == "https":
            pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
                address,
                target.port,
                timeout=timeout,
                retries=False,
                maxsize=1,
                server_hostname=target.host,
                assert_hostname=target.host,
            )
        else:
            pool = urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False, maxsize=1)
        try:
            answer = pool.urlopen(
                "POST",
                target.path,
                body=body,
                headers=headers,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
            )
            answer.read(MAX_ANSWER_BYTES)
            answer.release_conn()
        except urllib3.exceptions.NewConnectionError as error:  # a subclass of the timeout below
            raise _Undelivered(_reason(error)) from None
        except urllib3.exceptions.TimeoutError:
            raise _Undelivered(f"no answer within {self.settings.callback_timeout} s") from None
        except urllib3.exceptions.HTTPError as error:
            raise _Undelivered(_reason(error)) from None
        finally:
            pool.close()
        if not 200 <= answer.status < 300:
            raise _Undelivered(f"the receiver answered HTTP {answer.status}")

    def _save(self, job: Job, state: dict[str, Any], next_at: float | None) -> None:
        job.callback = state
        self.record(job.key, CALLBACK_FIELD, state, next_at, job.id)

    def record(self, key: str, field: str, state: dict[str, Any], next_at: float | None, entry: str) -> None:
        """Save a delivery's `state` in `field` of the hash `key`, if it still exists, and look
        at `entry` again at `next_at` (None: drop it)."""
        self._record(
            keys=[key, keys.CALLBACKS],
            args=[field, json.dumps(state), "" if next_at is None else next_at, entry],
        )


class _Undelivered(Exception):
    """An attempt that failed in a way worth retrying."""


def _end_of(job: Job) -> str:
    """Names one end of one job: the same for every delivery of it, new when the job runs again."""
    status = job.get_status(refresh=False)
    ended = job.ended_at.timestamp() if job.ended_at else 0
    return f"{status.value}-{job.attempts}-{ended:.3f}"


def _backoff(attempts: int) -> float:
    wait = min(BACKOFF * 2 ** (attempts - 1), MAX_BACKOFF)
    return wait * random.uniform(0.8, 1.2)


def _reason(error: Exception) -> str:
    cause = error
    while cause.__context__ is not None and not isinstance(cause, ConnectionRefusedError):
        cause = cause.__context__
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    return str(getattr(error, "reason", None) or error)
