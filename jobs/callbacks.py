"""Completion webhooks: when a job with a `callback_url` ends, its job view is POSTed there.

- **Where.** Each worker process runs a `WebhookSender`: a few threads beside the work loop, so a
  slow or dead receiver never holds up a job. Which job ends are due lives in Redis (the
  CALLBACKS sorted set: job id -> when to look next), so any worker's webhook sender may deliver
  any job's callback, and none is lost when a worker stops or dies mid-delivery.
- **When.** The end of a job (finished, failed, stopped, canceled) makes its entry due at
  once and publishes its id on CALLBACKS_CHANNEL, in the transaction or round trip that
  records the end, from whichever process records it (a work-horse, a worker, the web
  process): every webhook sender listens there and takes what is due at once, so the first free
  one delivers. Every job with a callback is also looked at now and then while it has not
  ended, so an end recorded by a path that does not say so (a dashboard action, a crash)
  is still delivered, only later.
- **At least once.** A webhook sender leases an entry (moves it LEASE seconds ahead) while it
  delivers; a webhook sender that dies mid-delivery leaves it to be taken again. An answer other
  than 2xx, a timeout or a connection error is retried with back-off until CALLBACK_RETRY_FOR
  seconds after the job's end; then its status is `failed`. Receivers deduplicate on the
  `Afterward-Delivery` header: the same for every delivery of one end of one job.
- **Signed, per key.** Each API key has a secret of its own, derived from CALLBACK_SECRET and
  the key's owner name (`key_secret`), which it reads at `GET /webhooks/secret`: a receiver
  holds only its own key's secret, so no tenant can sign a delivery for another. The
  signature covers the timestamp, the delivery id, the event and the body (`signed_content`).
- **Safe.** Only http and https URLs. The host's addresses are resolved and checked when the
  job is submitted and again at every delivery, and the request goes to the address that
  was checked: no loopback, private, link-local or otherwise non-public address (IPv6 forms
  that lead to an IPv4 address are judged by, or refused as, what they lead to) unless its
  host name or address is in CALLBACK_ALLOWED_HOSTS (names, addresses or networks). A
  refusal never names what a host name resolved to: internal DNS is no tenant's business.

RQ 3's own `Webhook` does not fit: it fires for `finished` and `failed` only, from the
worker's work loop (a slow receiver holds the worker up to its timeout), once, unsigned,
to any address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import urllib3
from rq.results import Result

from jobs import keys
from jobs.engine.job import CALLBACK_FIELD, Job
from jobs.settings import Settings
from jobs.times import iso, now
from jobs.view import is_terminal, job_view

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
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
# An unended job's entry is looked at again after its age, within these bounds (seconds).
RECHECK_MIN, RECHECK_MAX = 30, 300
# First retry after this many seconds, doubling, at most MAX_BACKOFF.
BACKOFF, MAX_BACKOFF = 1, 600
# Bytes of a receiver's answer that are read (and dropped).
MAX_ANSWER_BYTES = 64 * 1024
# How long a submission waits for the callback host's addresses before accepting it unchecked
# (it is checked again at every delivery), and how many lookups a web process runs at once:
# name resolution has no timeout of its own, so a stuck one holds its thread until the system
# resolver gives up; past this many, submissions are accepted unchecked at once.
SUBMIT_RESOLVE_SECONDS = 0.5
SUBMIT_RESOLVERS = 4
# What a key's signing secret is derived under (with its owner name): changing it changes
# every key's secret.
SECRET_LABEL = b"afterward webhook signing secret\n"

# CALLBACKS entries that are batches' ends (jobs.batches), not jobs: this, then the batch id.
BATCH_ENTRY = "batch:"

PENDING, RETRYING, DELIVERED, FAILED, REFUSED = "pending", "retrying", "delivered", "failed", "refused"
FINAL = frozenset({DELIVERED, FAILED, REFUSED})

# Take up to ARGV[3] entries due at ARGV[1], leasing each until ARGV[2]; each id with the
# score it had (0: its job's end was announced).
_TAKE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
for i = 1, #due, 2 do redis.call('ZADD', KEYS[1], ARGV[2], due[i]) end
return due
"""
# Record a delivery's state on the job, if the job still exists, and reschedule (ARGV[3]) or
# drop (ARGV[3] == '') its entry.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if ARGV[3] == '' then redis.call('ZREM', KEYS[2], ARGV[4])
else redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4]) end
"""


class CallbackRefused(ValueError):
    """A callback URL that may not be called: its scheme, form or addresses.

    The message is for the client; `address`, when a host name resolved to it, only for logs.
    """

    def __init__(self, message: str, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


@dataclass(frozen=True)
class Allowed:
    """CALLBACK_ALLOWED_HOSTS: host names, addresses and networks that may be non-public."""

    names: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowed:
        names: set[str] = set()
        networks = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.add(entry.lower().rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def admits(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if _public(address) or host.lower().rstrip(".") in self.names:
            return True
        return any(address in network for network in self.networks)


# IPv6 space a public receiver can have: global unicast (RFC 4291). Everything else in ::/8
# (IPv4-compatible ::/96, IPv4-translated ::ffff:0:0:0/96, local-use NAT64 64:ff9b:1::/48)
# leads nowhere public, or to an IPv4 address through a translator; Python's tables call some
# of it global.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
# The well-known NAT64 prefix (RFC 6052): a host behind DNS64 gets these for IPv4-only names,
# and connecting to one reaches the IPv4 address in its last 32 bits, which is what is judged.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Teredo and 6to4 reach IPv4 hosts through relays (the embedded address, obfuscated in
# Teredo's case); both are deprecated and no receiver's only address: refused outright.
_TUNNELS = (ipaddress.IPv6Network("2001::/32"), ipaddress.IPv6Network("2002::/16"))


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return _public(address.ipv4_mapped)
        if address in _NAT64:
            return _public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address not in _GLOBAL_UNICAST or any(address in tunnel for tunnel in _TUNNELS):
            return False
    return address.is_global and not address.is_multicast


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a URL's host is, when it is one (not a name to resolve)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class Target:
    """Where a callback goes: the URL's parts and the checked address to connect to."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


def parse_url(url: str) -> Target:
    """The parts of a callback URL, or CallbackRefused saying what is wrong with it."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"a callback URL may be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise CallbackRefused(f"not a valid URL ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise CallbackRefused("only http and https callback URLs are allowed")
    if not parts.hostname:
        raise CallbackRefused("the callback URL has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused(
            "a callback URL may not carry a user name or password; check the signature instead"
        )
    if any(ch.isspace() for ch in url):
        raise CallbackRefused("a callback URL may not contain spaces")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return Target(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path)


def resolve(target: Target, allowed: Allowed) -> str:
    """The address to connect to, after checking every address the host resolves to.

    CallbackRefused for a non-public address not allowed; OSError when the name does not resolve.
    """
    literal = _literal(target.host)
    if literal is not None:  # the client wrote the address: it may be named back
        if not allowed.admits(target.host, literal):
            raise CallbackRefused(
                f"{target.host} is not a public address and is not in CALLBACK_ALLOWED_HOSTS"
            )
        return str(literal)
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except UnicodeError:  # a label IDNA cannot encode (empty, or longer than 63 characters)
        raise CallbackRefused(f"{target.host} is not a valid host name") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    for address in addresses:
        if not allowed.admits(target.host, address):
            # Not which address: what an internal name resolves to is none of the client's business.
            raise CallbackRefused(
                f"{target.host} resolves to an address that is not public and is not in "
                "CALLBACK_ALLOWED_HOSTS",
                address=str(address),
            )
    return str(addresses[0])


# Lookups under way in this process (check_at_submit), each on a daemon thread of its own: a
# stuck one must neither hold a request nor keep the process from exiting.
_lookups = threading.BoundedSemaphore(SUBMIT_RESOLVERS)


def check_at_submit(url: str, settings: Settings) -> None:
    """Refuse a callback URL whose form or addresses are not allowed (CallbackRefused).

    Waits at most SUBMIT_RESOLVE_SECONDS. A host that does not resolve, or not in time, or
    while SUBMIT_RESOLVERS lookups are already under way, is accepted: every delivery
    checks it again.
    """
    target = parse_url(url)
    allowed = Allowed.parse(settings.callback_allowed_hosts)
    if _literal(target.host) is not None:
        resolve(target, allowed)  # nothing to look up
        return
    if not _lookups.acquire(blocking=False):
        log.warning(
            "callback host %s accepted unchecked: %d lookups under way", target.host, SUBMIT_RESOLVERS
        )
        return
    refused: list[CallbackRefused] = []
    done = threading.Event()

    def look_up() -> None:
        try:
            resolve(target, allowed)
        except CallbackRefused as error:
            refused.append(error)
        except OSError:
            pass
        finally:
            _lookups.release()
            done.set()

    threading.Thread(target=look_up, name="callback-resolve", daemon=True).start()
    if done.wait(SUBMIT_RESOLVE_SECONDS) and refused:
        log.info("callback URL refused: %s (%s)", refused[0], refused[0].address)
        raise refused[0]


# ---------------------------------------------------------------------- the job's side


def initial_state(url: str) -> dict[str, Any]:
    return {"url": url, "status": PENDING, "attempts": 0, "last_error": None, "delivered_at": None}


def register(pipe: Any, job: Job, url: str) -> None:
    """Give a new job its callback (in the transaction that creates the job)."""
    job.callback = initial_state(url)
    pipe.hset(job.key, CALLBACK_FIELD, json.dumps(job.callback))
    pipe.zadd(keys.CALLBACKS, {job.id: time.time() + RECHECK_MIN})


def due(pipe: Any, job: Job) -> None:
    """The job has ended: its callback is due now, and every webhook sender is told so (in the
    pipeline that records the end). A job of a batch also leaves the batch's jobs to wait for
    (jobs.batches): the last one to leave ends the batch, whose own callback is then due."""
    if job.callback is not None:
        pipe.zadd(keys.CALLBACKS, {job.id: 0})
        pipe.publish(keys.CALLBACKS_CHANNEL, job.id)
    if job.meta.get("batch_id"):
        from jobs import batches  # it delivers through this module's WebhookSender

        batches.job_ended(pipe, job)


def reset(pipe: Any, job: Job) -> None:
    """The job runs again (a retry or a requeue): its next end is delivered afresh."""
    if job.callback is not None:
        job.callback = initial_state(job.callback["url"])
        pipe.hset(job.key, CALLBACK_FIELD, json.dumps(job.callback))
        pipe.zadd(keys.CALLBACKS, {job.id: time.time() + RECHECK_MIN})


def key_secret(callback_secret: str, owner: str) -> str:
    """The secret that signs the deliveries of `owner`'s jobs (an API key's owner name, or
    `public` while the API is open): HMAC-SHA256 under CALLBACK_SECRET, so it is the same in
    every process, needs nothing stored, and tells nothing of CALLBACK_SECRET or other keys'."""
    return hmac.new(callback_secret.encode(), SECRET_LABEL + owner.encode(), hashlib.sha256).hexdigest()


def signed_content(timestamp: str, delivery: str, event: str, body: bytes) -> bytes:
    """What `Afterward-Signature` signs: the three headers and the body, a line break apart.

    Not dots: the delivery id and the event hold dots, so with dots a forger could move the
    boundary between them (and defeat deduplication); a header value cannot hold a line break.
    """
    return f"{timestamp}\n{delivery}\n{event}\n".encode() + body


def signature(secret: str, timestamp: str, delivery: str, event: str, body: bytes) -> str:
    """The `Afterward-Signature` header's value."""
    content = signed_content(timestamp, delivery, event, body)
    return "sha256=" + hmac.new(secret.encode(), content, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------- delivering


class WebhookSender:
    """Delivers due callbacks from one process, on `CALLBACK_CONCURRENCY` threads."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.allowed = Allowed.parse(settings.callback_allowed_hosts)
        self._take = connection.register_script(_TAKE)
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
            from jobs import batches

            batches.deliver(self, job_id.removeprefix(BATCH_ENTRY))
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
