"""Accepting `POST /jobs/<type>`: its job written atomically (jobs.submission), at most once per
idempotency key, with its place in its key's share taken in the round trip of its rate-limit hit."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import request
from rq.exceptions import NoSuchJobError

from jobs import keys
from jobs.engine.job import Job
from jobs.settings import Settings
from jobs.submission import Reservation, check_admitted, enqueue, prepare, settle
from jobs.types.registry import JobType
from service.errors import ApiError
from service.requests import current_request_id
from service.security import check_request, count_request
from service.state import AppState

MAX_IDEMPOTENCY_KEY_LENGTH = 255
# Seconds a claimed idempotency key may point at a job not written yet before it is taken over.
CLAIM_PATIENCE = 10


@dataclass
class Submission:
    job: Job
    created: bool  # False when an idempotent replay returned an earlier job


def submit(
    state: AppState,
    type_name: str,
    job_type: JobType,
    body: dict[str, Any],
    owner: str,
    idempotency_key: str | None,
) -> Submission:
    settings = state.settings
    prepared = prepare(settings, state.queues, type_name, job_type, body, owner, current_request_id())
    job, kwargs = prepared.job, prepared.kwargs
    # With API keys, the job takes its place in its key's share of Redis first (jobs.quota),
    # in the round trip of the request's rate-limit hit and idempotency claim.
    reserve = _reservation(settings, owner, job.id) if settings.api_keys else None
    if idempotency_key is not None:
        key = keys.idempotency(owner, idempotency_key)
        earlier = _claim(state, key, job.id, prepared.fingerprint, reserve)
        if earlier is not None:
            return Submission(earlier, created=False)
    elif reserve is not None:
        reserve_with_hit(state, reserve)

    if job_type.admit is not None:  # a new request: what its key holds may refuse it (a 429)
        try:
            job_type.admit(kwargs, owner, state.redis, settings)
        except Exception:  # refused: neither the idempotency key nor the share keeps a place
            if idempotency_key is not None:
                state.redis.delete(keys.idempotency(owner, idempotency_key))
            _release(state, reserve)
            raise
    with state.redis.pipeline() as pipe:  # one transaction: the job exists, queued, or not at all
        enqueue(pipe, prepared, settings)
        pipe.execute()
    settle(state.redis, [prepared])
    return Submission(job, created=True)


def _reservation(settings: Settings, owner: str, job_id: str) -> Reservation:
    size = request.content_length or len(request.get_data(cache=True))
    return Reservation(settings, owner, job_id, size, time.time())


def _claim(
    state: AppState,
    key: str,
    job_id: str,
    fingerprint: str,
    place: Any = None,
    fetch: Callable[[str], Any] | None = None,
) -> Any:
    """Claim an idempotency key for `job_id`, or return the job an earlier request created.

    The key is claimed (SET NX) before the job is enqueued, so a repeat arriving meanwhile
    finds it: with its job not yet written it gets a 409 and retries; a claim whose job never
    appeared (the process died in between) is taken over after a few seconds.

    `place` is a `Reservation` (or anything that reserves and releases like one); `fetch` reads
    what an earlier request made (NoSuchJobError when it is not there): a job by default.
    """
    record = json.dumps({"job_id": job_id, "fingerprint": fingerprint, "at": time.time()})
    ttl = state.settings.idempotency_ttl
    # The first claim goes in one round trip with the request's rate-limit hit.
    with state.redis.pipeline(transaction=False) as pipe:
        count_request(pipe)
        pipe.set(key, record, nx=True, ex=ttl)
        if place is not None:
            place.reserve(pipe)
        results = pipe.execute()
    try:
        claimed, *admitted = check_request(results)
        if admitted and claimed:  # a repeat is answered whatever the key's share holds
            check_admitted(admitted[0], state.settings)
    except ApiError:
        claimed_now = results[-2] if place is not None else results[-1]
        if claimed_now:  # refused: the key protects nothing, a later repeat must not wait for it
            state.redis.delete(key)
        if place is not None and int(results[-1][0]):  # over the rate limit: the place is freed
            _release(state, place)
        raise
    if claimed:
        return None
    admitted_now = place is not None and int(results[-1][0])
    try:
        earlier = _repeat_of(state, key, record, fingerprint, fetch)
    except ApiError:
        if admitted_now:
            _release(state, place)
        raise
    if earlier is not None and admitted_now:  # a repeat takes no place of its own
        _release(state, place)
    elif earlier is None and place is not None and not admitted_now:
        # The key was claimed anew (its earlier job is gone): a new job after all, refused.
        state.redis.delete(key)
        check_admitted(results[-1], state.settings)
    return earlier


def reserve_with_hit(state: AppState, place: Any) -> None:
    """Count the request against its rate limit and reserve `place` (one job's or a batch's,
    all or none) in the key's share, in one round trip; a 429 for either, with nothing kept."""
    with state.redis.pipeline(transaction=False) as pipe:
        count_request(pipe)
        place.reserve(pipe)
        results = pipe.execute()
    try:
        (admitted,) = check_request(results)
    except ApiError:  # over the rate limit: what it reserved is freed
        if int(results[-1][0]):
            _release(state, place)
        raise
    check_admitted(admitted, state.settings)  # refused: nothing was reserved


def _release(state: AppState, place: Any) -> None:
    if place is not None:
        with state.redis.pipeline(transaction=False) as pipe:
            place.release(pipe)
            pipe.execute()


def _repeat_of(
    state: AppState, key: str, record: str, fingerprint: str, fetch: Callable[[str], Any] | None = None
) -> Any:
    """The job of the earlier request that claimed `key`; None once `key` is claimed anew."""
    ttl = state.settings.idempotency_ttl
    while True:
        remembered = state.redis.get(key)
        if remembered is not None:
            earlier = json.loads(remembered)
            if earlier["fingerprint"] != fingerprint:
                raise ApiError(
                    422,
                    "This Idempotency-Key was already used with a different request.",
                    code="idempotency_key_reused",
                    details={"job_id": earlier["job_id"]},
                )
            try:
                if fetch is not None:
                    return fetch(earlier["job_id"])
                return Job.fetch(earlier["job_id"], connection=state.redis)
            except NoSuchJobError:
                if time.time() - earlier.get("at", 0) < CLAIM_PATIENCE:
                    raise ApiError(
                        409,
                        "A request with this Idempotency-Key is still being accepted; retry in a moment.",
                        code="conflict",
                        headers={"Retry-After": "1"},
                    ) from None
                # The earlier job never appeared, or has expired: the key protects nothing now.
                state.redis.delete(key)
        # Free again (expired or taken over): claim it anew.
        if state.redis.set(key, record, nx=True, ex=ttl):
            return None


def check_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not value or len(value) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise ApiError(
            422,
            f"The Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters.",
            details=[{"field": "Idempotency-Key", "message": "invalid length", "type": "header"}],
        )
    return value
