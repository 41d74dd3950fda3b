"""The operators' overview: every queue, its jobs by state, and the workers serving it."""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, Response, jsonify
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.worker_registration import REDIS_WORKER_KEYS

from jobs.families import EMBED, GENERAL, family_queues
from jobs.times import parse_iso
from service.security import current_owner
from service.state import get_state
from service.workers import STALE_AFTER_SECONDS

bp = Blueprint("queues", __name__)

REGISTRIES = {
    "started": StartedJobRegistry,
    "scheduled": ScheduledJobRegistry,
    "deferred": DeferredJobRegistry,
    "failed": FailedJobRegistry,
    "finished": FinishedJobRegistry,
}
PROCESS_TYPES = {GENERAL: "worker", EMBED: "embedder"}


@bp.get("/queues")
def list_queues() -> Response:
    """Counts by state per queue (all clients' jobs), the age of the oldest queued job, and the
    live workers serving each queue. A worker's current jobs are named only to their owner."""
    state = get_state()
    connection = state.redis
    queues = [(family, name) for family in (GENERAL, EMBED) for name in family_queues(family)]
    with connection.pipeline(transaction=False) as pipe:
        for _, name in queues:
            queue = state.queues[name]
            pipe.llen(queue.key)
            pipe.lindex(queue.key, 0)
            for registry in REGISTRIES.values():
                pipe.zcard(registry(name, connection=connection).key)
        pipe.smembers(REDIS_WORKER_KEYS)
        answers = pipe.execute()
    worker_keys = sorted(key.decode() for key in answers.pop())
    per_queue = len(REGISTRIES) + 2
    oldest_ids = [answers[i * per_queue + 1] for i in range(len(queues))]
    with connection.pipeline(transaction=False) as pipe:
        for job_id in oldest_ids:
            if job_id:
                pipe.hget(f"rq:job:{job_id.decode()}", "enqueued_at")
            else:
                pipe.echo("")
        for key in worker_keys:
            pipe.hmget(key, "state", "last_heartbeat", "death", "queues")
            pipe.smembers(f"{key}:executions")
        more = pipe.execute()
    enqueued = more[: len(queues)]
    workers = _live_workers(worker_keys, more[len(queues) :])
    owned = _owned_jobs(connection, {job for worker in workers for job in worker["jobs"]})
    now = time.time()
    listing = []
    for i, (family, name) in enumerate(queues):
        counts = answers[i * per_queue : (i + 1) * per_queue]
        oldest = enqueued[i]
        listing.append(
            {
                "name": name,
                "process_type": PROCESS_TYPES[family],
                "counts": {"queued": counts[0], **dict(zip(REGISTRIES, counts[2:], strict=True))},
                "oldest_queued_seconds": _age(oldest, now),
                "workers": [
                    {
                        "name": worker["name"],
                        "state": worker["state"],
                        "last_heartbeat": worker["last_heartbeat"],
                        "current_jobs": [job for job in worker["jobs"] if job in owned],
                    }
                    for worker in workers
                    if name in worker["queues"]
                ],
            }
        )
    return jsonify(queues=listing)


def _age(enqueued_at: bytes | None, now: float) -> float | None:
    """Seconds since `enqueued_at` (RQ's timestamp), None for an empty queue."""
    if not enqueued_at:
        return None
    return round(max(0.0, now - parse_iso(enqueued_at.decode()).timestamp()), 3)


def _live_workers(keys: list[str], answers: list[Any]) -> list[dict[str, Any]]:
    """Workers that heartbeated lately and have not died, with the jobs they are running."""
    live = []
    for index, key in enumerate(keys):
        (worker_state, heartbeat, death, queues), executions = answers[2 * index], answers[2 * index + 1]
        if heartbeat is None or death is not None:
            continue
        beat = parse_iso(heartbeat.decode())
        if time.time() - beat.timestamp() >= STALE_AFTER_SECONDS:
            continue
        live.append(
            {
                "name": key.removeprefix("rq:worker:"),
                "state": (worker_state or b"").decode(),
                "last_heartbeat": heartbeat.decode(),
                "queues": (queues or b"").decode().split(","),
                "jobs": sorted({execution.decode().split(":", 1)[0] for execution in executions}),
            }
        )
    return live


def _owned_jobs(connection: Any, job_ids: set[str]) -> set[str]:
    """Those of `job_ids` the caller's key owns."""
    if not job_ids:
        return set()
    ordered = sorted(job_ids)
    with connection.pipeline(transaction=False) as pipe:
        for job_id in ordered:
            pipe.hget(f"rq:job:{job_id}", "meta")
        metas = pipe.execute()
    owner = current_owner()
    return {
        job_id
        for job_id, meta in zip(ordered, metas, strict=True)
        if meta and json.loads(meta).get("owner") == owner
    }
