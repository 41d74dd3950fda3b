"""Completion webhooks: when a job with a `callback_url` ends, its job view is POSTed there.

- **Where.** Each worker process runs a `WebhookSender` (jobs.webhook_sender): a few threads
  beside the work loop, so a slow or dead receiver never holds up a job. Which job ends are
  due lives in Redis (the CALLBACKS sorted set: job id -> when to look next), so any worker's
  sender may deliver any job's callback, and none is lost when a worker stops or dies mid-delivery.
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
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from jobs import batches, keys
from jobs.deliveries import initial_state
from jobs.settings import Settings

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
# An unended job's entry is looked at again after its age, within these bounds (seconds).
RECHECK_MIN, RECHECK_MAX = 30, 300
# The job hash field holding its completion webhook's URL and delivery state.
CALLBACK_FIELD = "afterward_callback"
# How long a submission waits for the callback host's addresses before accepting it unchecked
# (it is checked again at every delivery), and how many lookups a web process runs at once:
# name resolution has no timeout of its own, so a stuck one holds its thread until the system
# resolver gives up; past this many, submissions are accepted unchecked at once.
SUBMIT_RESOLVE_SECONDS = 0.5
SUBMIT_RESOLVERS = 4
# What a key's signing secret is derived under (with its owner name): changing it changes
# every key's secret.
SECRET_LABEL = b"afterward webhook signing secret\n"


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


def register(pipe: Any, job: Any, url: str) -> None:
    """Give a new job its callback (in the transaction that creates the job)."""
    job.callback = initial_state(url)
    pipe.hset(job.key, CALLBACK_FIELD, json.dumps(job.callback))
    pipe.zadd(keys.CALLBACKS, {job.id: time.time() + RECHECK_MIN})


def due(pipe: Any, job: Any) -> None:
    """The job has ended: its callback is due now, and every webhook sender is told so (in the
    pipeline that records the end). A job of a batch also leaves the batch's jobs to wait for
    (jobs.batches): the last one to leave ends the batch, whose own callback is then due."""
    if job.callback is not None:
        pipe.zadd(keys.CALLBACKS, {job.id: 0})
        pipe.publish(keys.CALLBACKS_CHANNEL, job.id)
    if job.meta.get("batch_id"):
        batches.job_ended(pipe, job)


def reset(pipe: Any, job: Any) -> None:
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
