"""The batches API: up to MAX_JOBS jobs in one request, accepted all or none, followed as one."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field
from rq.exceptions import NoSuchJobError

from jobs import batches, keys, quota
from jobs.batches import MAX_JOBS
from jobs.refusals import validate
from jobs.settings import Settings
from jobs.submission import JOB_ID, Prepared, check_callback_url, enqueue, prepare, settle, share_limits
from service.body import query_args, read_json_object
from service.errors import ApiError
from service.replication import acknowledges_writes
from service.requests import current_request_id
from service.security import current_owner, folds_rate_limit
from service.state import AppState, get_state
from service.submit import _claim, _release, check_idempotency_key, reserve_with_hit

bp = Blueprint("batches", __name__)
log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 60
# A batch's Idempotency-Key is remembered apart from the same key sent to POST /jobs.
IDEMPOTENCY_NAMESPACE = "batch:"


class BatchBody(BaseModel):
    """`POST /batches` body."""

    model_config = ConfigDict(extra="forbid")
    jobs: list[Any] = Field(
        min_length=1,
        max_length=MAX_JOBS,
        description=f"1 to {MAX_JOBS} jobs, each a `type` and the fields `POST /jobs/<type>` takes.",
    )
    callback_url: str | None = Field(
        default=None, description="Receives one signed `batch.ended` delivery when every job has ended."
    )


class ReadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wait: float = Field(default=0, ge=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False)


@bp.post("/batches")
# As POST /jobs: with an Idempotency-Key or API keys, the hit goes with the claim or the places.
@folds_rate_limit(when=lambda: "Idempotency-Key" in request.headers or bool(get_state().settings.api_keys))
@acknowledges_writes
def create_batch() -> Response:
    state = get_state()
    settings = state.settings
    owner = current_owner()
    idempotency_key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    body = validate(BatchBody, read_json_object())
    if body.callback_url is not None:
        check_callback_url(body.callback_url, settings)
    prepared = _prepare_all(state, body.jobs, owner)
    batch_id = uuid.uuid4().hex
    for each in prepared:
        each.job.meta["batch_id"] = batch_id
        # The job view shows the fields under `view` (jobs.view.job_view).
        each.job.meta["view"] = dict(each.job.meta.get("view", {}), batch_id=batch_id)
    job_ids = [each.job.id for each in prepared]
    places = None
    if settings.api_keys:
        places = _Reservations(settings, owner, _sizes(body.jobs, job_ids), time.time())

    if idempotency_key is not None:
        fingerprint = _fingerprint(prepared, body.callback_url)
        key = keys.idempotency(owner, IDEMPOTENCY_NAMESPACE + idempotency_key)
        earlier = _claim(
            state, key, batch_id, fingerprint, places, fetch=lambda found: _earlier(state, found)
        )
        if earlier is not None:
            response = _batch_response(batches.public(earlier), 200)
            response.headers["Idempotent-Replayed"] = "true"
            return response
    elif places is not None:
        reserve_with_hit(state, places)

    try:
        _admit_all(state, prepared, owner)
    except Exception:  # refused: neither the idempotency key nor the share keeps a place
        if idempotency_key is not None:
            state.redis.delete(keys.idempotency(owner, IDEMPOTENCY_NAMESPACE + idempotency_key))
        _release(state, places)
        raise
    with state.redis.pipeline() as pipe:  # one transaction: every job and the batch, or nothing
        for each in prepared:
            enqueue(pipe, each, settings)
        created_at = batches.create(pipe, batch_id, owner, job_ids, body.callback_url, settings.result_ttl)
        pipe.execute()
    settle(state.redis, prepared)  # jobs whose dependencies ended meanwhile are queued now
    log.info("batch %s accepted: %d jobs", batch_id, len(job_ids))
    view = {
        "id": batch_id,
        "total": len(job_ids),
        "created_at": created_at,
        "job_ids": job_ids,
        "callback": None if body.callback_url is None else {"url": body.callback_url, "status": "pending"},
    }
    return _batch_response(view, 202)


@bp.get("/batches/<batch_id>")
def read_batch(batch_id: str) -> Response:
    state = get_state()
    query = validate(ReadQuery, query_args())
    owner = current_owner()
    view = _load(state, batch_id, owner)
    if query.wait > 0 and not view["done"]:
        view = _read_until_done(state, batch_id, owner, query.wait)
    return jsonify(batches.public(view))


# ---------------------------------------------------------------------- accepting


def _prepare_all(state: AppState, items: list[Any], owner: str) -> list[Prepared]:
    """Every item validated and built as `POST /jobs/<type>` would; one 422 naming every bad
    item's fields (`jobs[3].message`) when any is bad."""
    prepared: list[Prepared] = []
    problems: list[dict[str, Any]] = []
    request_id = current_request_id()
    for index, item in enumerate(items):
        where = f"jobs[{index}]"
        if not isinstance(item, dict):
            problems.append({"field": where, "message": "expected an object", "type": "object_type"})
            continue
        type_name = item.get("type")
        job_type = state.job_types.get(type_name) if isinstance(type_name, str) else None
        if job_type is None:
            known = ", ".join(sorted(state.job_types))
            message = f"unknown job type; the types are {known}" if type_name else "a job type is required"
            problems.append({"field": f"{where}.type", "message": message, "type": "unknown_job_type"})
            continue
        fields = {name: value for name, value in item.items() if name != "type"}
        try:
            prepared.append(
                prepare(state.settings, state.queues, type_name, job_type, fields, owner, request_id)
            )
        except ApiError as error:
            problems.extend(_located(where, error))
    if problems:
        raise ApiError(422, "The request has invalid jobs.", details=problems)
    return prepared


def _located(where: str, error: ApiError) -> list[dict[str, Any]]:
    """An item's validation error, each field named under its place in the batch."""
    if isinstance(error.details, list) and all(isinstance(item, dict) for item in error.details):
        return [
            dict(item, field=f"{where}.{item['field']}" if item.get("field") else where)
            for item in error.details
        ]
    return [{"field": where, "message": error.message, "type": error.code}]


def _admit_all(state: AppState, prepared: list[Prepared], owner: str) -> None:
    """Each job type's own admission check (an embed job's document caps), job by job."""
    for index, each in enumerate(prepared):
        if each.job_type.admit is None:
            continue
        try:
            each.job_type.admit(each.kwargs, owner, state.redis, state.settings)
        except ApiError as error:
            error.message = f"jobs[{index}]: {error.message}"
            raise


@dataclass
class _Reservations:
    """The batch's jobs' places in their key's share of Redis (jobs.quota): all or none."""

    settings: Settings
    owner: str
    sizes: dict[str, int]
    at: float

    def reserve(self, pipe: Any) -> None:
        quota.reserve_many(
            pipe,
            self.owner,
            self.sizes,
            **share_limits(self.settings, self.at),
        )

    def release(self, pipe: Any) -> None:
        quota.release_many(pipe, self.owner, list(self.sizes))


def _sizes(items: list[Any], job_ids: list[str]) -> dict[str, int]:
    """Each job's share of the request's bytes: its item's, as JSON."""
    return {
        job_id: len(json.dumps(item, separators=(",", ":")))
        for job_id, item in zip(job_ids, items, strict=True)
    }


def _fingerprint(prepared: list[Prepared], callback_url: str | None) -> str:
    canonical = json.dumps([[each.fingerprint for each in prepared], callback_url], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _earlier(state: AppState, batch_id: str) -> dict[str, Any]:
    """The batch an earlier request with the same Idempotency-Key made (NoSuchJobError: none yet)."""
    view = batches.read(state.redis, batch_id)
    if view is None:
        raise NoSuchJobError(batch_id)
    return view


def _batch_response(view: dict[str, Any], status: int) -> Response:
    response = jsonify(view)
    response.status_code = status
    response.headers["Location"] = url_for("batches.read_batch", batch_id=view["id"])
    return response


# ---------------------------------------------------------------------- reading


def _load(state: AppState, batch_id: str, owner: str) -> dict[str, Any]:
    """The batch view, for its owner only (404 for anyone else); a batch whose every job shows
    its end, although no one announced the last, is ended as it is read."""
    if not JOB_ID.fullmatch(batch_id):
        raise _not_found()
    view = batches.read(state.redis, batch_id)
    if view is None or view["owner"] != owner:
        raise _not_found()
    if batches.settle(state.redis, batch_id, view):
        view = batches.read(state.redis, batch_id) or view
    return view


def _read_until_done(state: AppState, batch_id: str, owner: str, seconds: float) -> dict[str, Any]:
    """Read the batch until it is done or `seconds` pass (as GET /jobs/<id>?wait= does: woken
    by the end event, riding out Redis errors until the deadline); once when no slot is free."""
    deadline = time.monotonic() + seconds
    with state.waiter.slot() as may_wait:
        if not may_wait:
            return _load(state, batch_id, owner)
        with state.waiter.watch(batch_id) as ended:  # the batch's end is published on its id
            view = _load(state, batch_id, owner)
            lost: redis.exceptions.RedisError | None = None
            while lost or not view["done"]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ended.wait(min(remaining, max(0.1, state.settings.long_poll_recheck)))
                ended.clear()
                try:
                    view = _load(state, batch_id, owner)
                    lost = None
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
                    lost = error
            if lost:
                view = _load(state, batch_id, owner)
            return view


def _not_found() -> ApiError:
    return ApiError(404, "No such batch.")
