"""The operators' overview: every queue, its jobs by state, and the workers serving it; and
the operators' pause and resume of one queue (jobs.engine.pause)."""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, Response, jsonify
from rq import Worker
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE
from rq.job import Job
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.worker_registration import REDIS_WORKER_KEYS

from jobs import keys
from jobs.engine import fair, pause
from jobs.families import EMBED, GENERAL, family_queues
from jobs.times import parse_iso
from service.errors import ApiError
from service.replication import acknowledges_writes
from service.security import current_owner, require_operator
from service.state import get_state
from service.workers import is_live

bp = Blueprint("queues", __name__)

REGISTRIES = {
    "started": StartedJobRegistry,
    "scheduled": ScheduledJobRegistry,
    "deferred": DeferredJobRegistry,
    "failed": FailedJobRegistry,
    "finished": FinishedJobRegistry,
}
PROCESS_TYPES = {GENERAL: "worker", EMBED: "embedder"}
# The earliest `enqueued_at` among the first ARGV[2] jobs on the queue: with the fair share
# (jobs.engine.fair) the queue holds each key's oldest job, in the order keys take turns.
OLDEST_QUEUED = """
local oldest = false
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)) do
  local at = redis.call('HGET', ARGV[1] .. id, 'enqueued_at')
  if at and at ~= '' and (not oldest or at < oldest) then oldest = at end
end
return oldest
"""


@bp.get("/queues")
def list_queues() -> Response:
    """Counts by state per queue (all clients' jobs), the age of the oldest queued job, and the
    live workers serving each queue. A worker's current jobs are named only to their owner.

    Every count is read in O(1) or O(log n) from a registry or a count kept as jobs change
    state (jobs waiting their key's turn, stopped jobs), never by walking the jobs: the cost
    of a call does not grow with the jobs the queues hold.
    """
    state = get_state()
    connection = state.redis
    queues = [(family, name) for family in (GENERAL, EMBED) for name in family_queues(family)]
    now = time.time()
    with connection.pipeline(transaction=False) as pipe:
        for _, name in queues:
            queue = state.queues[name]
            pipe.llen(queue.key)
            pipe.get(keys.fair_waiting_count(name))
            pipe.eval(OLDEST_QUEUED, 1, queue.key, Job.redis_job_namespace_prefix, fair.SCAN)
            for registry in REGISTRIES.values():
                key = registry(name, connection=connection).key
                if registry is FailedJobRegistry:  # scored by expiry: what is left of it
                    pipe.zcount(key, now, "+inf")
                else:
                    pipe.zcard(key)
            pipe.zcount(keys.stopped(name), now, "+inf")
            pipe.get(keys.paused(name))
        pipe.smembers(REDIS_WORKER_KEYS)
        answers = pipe.execute()
    worker_keys = sorted(key.decode() for key in answers.pop())
    per_queue = len(REGISTRIES) + 5
    with connection.pipeline(transaction=False) as pipe:
        for key in worker_keys:
            pipe.hmget(key, "state", "last_heartbeat", "death", "queues")
            pipe.smembers(
                WORKER_EXECUTIONS_KEY_TEMPLATE.format(key.removeprefix(Worker.redis_worker_namespace_prefix))
            )
        more = pipe.execute()
    workers = _live_workers(worker_keys, more)
    owned = _owned_jobs(connection, {job for worker in workers for job in worker["jobs"]})
    listing = []
    for i, (family, name) in enumerate(queues):
        *counts, paused = answers[i * per_queue : (i + 1) * per_queue]
        queue_state = pause.state(name, paused)
        listing.append(
            {
                "name": name,
                "process_type": PROCESS_TYPES[family],
                "counts": _counts(counts),
                "oldest_queued_seconds": _age(counts[2], now),
                "paused": queue_state["paused"],
                "paused_at": queue_state["paused_at"],
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


@bp.post("/queues/<name>/pause")
@acknowledges_writes
def pause_queue(name: str) -> Response:
    """Workers take no further job off the queue until it is resumed; running jobs run on, and
    submissions are still accepted (they wait). Pausing a paused queue changes nothing."""
    connection = _operators_queue(name)
    return jsonify(pause.pause(connection, name, by=current_owner()))


@bp.post("/queues/<name>/resume")
@acknowledges_writes
def resume_queue(name: str) -> Response:
    """Workers take the queue's jobs again, idle ones at once."""
    connection = _operators_queue(name)
    return jsonify(pause.resume(connection, name))


def _operators_queue(name: str) -> Any:
    """The connection to act on queue `name` with: 403 unless an operator asks, 404 for no such queue."""
    require_operator()
    state = get_state()
    if name not in state.queues:
        raise ApiError(404, f"No such queue; the queues are {', '.join(state.queues)}.")
    return state.redis


def _counts(answers: list[Any]) -> dict[str, int]:
    """A queue's jobs by state, from its pipeline answers: on the queue, waiting their key's
    turn, the oldest, the registries, stopped."""
    counts = {"queued": answers[0] + max(0, int(answers[1] or 0))}
    counts.update(zip(REGISTRIES, answers[3:-1], strict=True))
    counts["stopped"] = answers[-1]
    counts["failed"] = max(0, counts["failed"] - counts["stopped"])  # RQ keeps stopped jobs there too
    return counts


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
        if not is_live(heartbeat, death):
            continue
        live.append(
            {
                "name": key.removeprefix(Worker.redis_worker_namespace_prefix),
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
            pipe.hget(Job.key_for(job_id), "meta")
        metas = pipe.execute()
    owner = current_owner()
    return {
        job_id
        for job_id, meta in zip(ordered, metas, strict=True)
        if meta and json.loads(meta).get("owner") == owner
    }
