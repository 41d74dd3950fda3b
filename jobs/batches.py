"""Batches: many jobs accepted in one transaction, followed as one, and announced once when the
last of them ends.

- **What is kept.** Per batch (jobs.keys): a hash (owner, total, created_at, ended_at, the
  callback's URL and delivery state), the job ids in order, and the set of ids whose end has
  not been recorded yet (`pending`). Each job carries `batch_id` in its meta.
- **The end, once.** Wherever a job's final end is recorded (`Job._handle_failure`, in the
  transaction that records a failure, the maintenance round's included) or announced
  (`callbacks.due`: the worker's success and failure, the web process's cancel), `job_ended`
  removes it from `pending`, once its hash shows the end (an end announced a moment before
  it is recorded is taken when it is recorded), and, in the same script, ends the batch
  when `pending` is empty:
  `ended_at` is set only if it was not (HSETNX), and only the call that sets it makes the
  batch's callback due and expires the batch. However its jobs end, in whatever order, on
  whichever workers, a batch ends once.
- **Unannounced ends.** An end recorded by a path that does not announce it (a dashboard
  action, a job deleted) is found by `sweep`, which each worker's maintenance round runs: it
  looks at open batches now and then (BATCHES_OPEN, by when to look next), removes every job
  that has ended or is gone from `pending`, and ends the batch the same way.
- **Delivery.** A batch's callback is an entry `batch:<id>` in the CALLBACKS sorted set, which
  every worker's WebhookSender takes and leases like a job's (jobs.webhook_sender): signed with the
  owner's key secret, event `batch.ended`, `Afterward-Delivery: <id>.ended`, retried with
  back-off. The body is the batch view, as `GET /batches/<id>` shows it.
- **Lifetime.** A batch lives while its jobs wait or run (as queued jobs do), and RESULT_TTL
  after it ends, like its last job.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from rq.job import Job, JobStatus

from jobs import keys
from jobs.deliveries import BATCH_ENTRY, TAKE, initial_state
from jobs.times import iso, now

log = logging.getLogger(__name__)

# Most jobs one batch may hold.
MAX_JOBS = 1000
# A new batch is first swept this long after it is accepted; an open one then every
# SWEEP_EVERY seconds (a sweep's look at one batch is one round trip).
SWEEP_FIRST = 30
SWEEP_EVERY = 30
# Open batches one sweep looks at, at most, and how long it holds them while it does.
SWEEP_BATCHES = 100
SWEEP_LEASE = 60
# A batch's end can be recorded a moment before its last job's failure is (RQ tells its
# exception handlers, which announce it, before it writes an abandoned job's failure):
# its delivery waits for every job to show its end, looking again this often, at most
# SETTLE seconds.
SETTLE_RECHECK = 0.5
SETTLE = 30
STATUSES = (
    "queued",
    "rate_limited",
    "started",
    "finished",
    "failed",
    "deferred",
    "scheduled",
    "canceled",
    "stopped",
)
# A job already gone (expired RESULT_TTL after its end, or deleted) is counted so.
EXPIRED = "expired"
# A job's final ends (as jobs.engine.job.TERMINAL_STATUSES), and EXPIRED.
_TERMINAL = frozenset(
    status.value for status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED)
) | {EXPIRED}

# Leave `pending` (ARGV[1], '' for none) once the job's hash shows its end (an end announced
# before it is recorded is taken when it is), and, when `pending` is empty, end the batch once.
# KEYS: batch hash, its job list, its pending set, BATCHES_OPEN, CALLBACKS, the job's hash.
# ARGV: job id, batch id, ended_at (ISO 8601), the callback entry, JOB_EVENTS_CHANNEL,
# CALLBACKS_CHANNEL. Returns 1 when this call ended the batch.
_END = """
if ARGV[1] ~= '' then
  local status = redis.call('HGET', KEYS[6], 'status')
  if status and status ~= 'finished' and status ~= 'failed' and status ~= 'stopped'
      and status ~= 'canceled' then
    return 0
  end
  redis.call('SREM', KEYS[3], ARGV[1])
end
if redis.call('SCARD', KEYS[3]) > 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[4], ARGV[2])
  return 0
end
if redis.call('HSETNX', KEYS[1], 'ended_at', ARGV[3]) == 0 then return 0 end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl'))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('ZREM', KEYS[4], ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'callback') == 1 then
  redis.call('ZADD', KEYS[5], 0, ARGV[4])
  redis.call('PUBLISH', ARGV[6], ARGV[4])
end
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 1
"""


def entry(batch_id: str) -> str:
    """The batch's entry in the CALLBACKS sorted set."""
    return BATCH_ENTRY + batch_id


def create(
    pipe: Any,
    batch_id: str,
    owner: str,
    job_ids: list[str],
    callback_url: str | None,
    ttl: int,
) -> str:
    """Write a new batch on `pipe`, in the transaction that enqueues its jobs; its created_at."""
    created_at = iso(now())
    fields: dict[str, Any] = {"owner": owner, "total": len(job_ids), "created_at": created_at, "ttl": ttl}
    if callback_url is not None:
        fields["callback"] = json.dumps(initial_state(callback_url))
    pipe.hset(keys.batch(batch_id), mapping=fields)
    pipe.rpush(keys.batch_jobs(batch_id), *job_ids)
    pipe.sadd(keys.batch_pending(batch_id), *job_ids)
    pipe.zadd(keys.BATCHES_OPEN, {batch_id: time.time() + SWEEP_FIRST})
    return created_at


def job_ended(pipe: Any, job: Any) -> None:
    """`job` of a batch reached its final end (in the pipeline that records or announces it;
    after the commands that record it, which the script checks)."""
    _queue_end(pipe, job.meta["batch_id"], job.id)


def _queue_end(client: Any, batch_id: str, job_id: str) -> Any:
    return client.eval(
        _END,
        6,
        keys.batch(batch_id),
        keys.batch_jobs(batch_id),
        keys.batch_pending(batch_id),
        keys.BATCHES_OPEN,
        keys.CALLBACKS,
        Job.key_for(job_id) if job_id else keys.batch(batch_id),
        job_id,
        batch_id,
        iso(now()),
        entry(batch_id),
        keys.JOB_EVENTS_CHANNEL,
        keys.CALLBACKS_CHANNEL,
    )


# ---------------------------------------------------------------------- reading


def read(connection: redis.Redis, batch_id: str) -> dict[str, Any] | None:
    """The batch view (what `GET /batches/<id>` and the callback show), with its `owner`; None
    when there is no such batch. Two round trips, whatever the batch's size."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.batch(batch_id))
        pipe.lrange(keys.batch_jobs(batch_id), 0, -1)
        fields, raw_ids = pipe.execute()
    if not fields or b"owner" not in fields:
        return None
    job_ids = [job_id.decode() for job_id in raw_ids]
    with connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        statuses = pipe.execute()
    counts = dict.fromkeys((*STATUSES, EXPIRED), 0)
    for status in statuses:
        name = status.decode() if status else EXPIRED
        counts[name] = counts.get(name, 0) + 1
    text = {name.decode(): value.decode() for name, value in fields.items()}
    callback = json.loads(text["callback"]) if "callback" in text else None
    ended_at = text.get("ended_at")
    return {
        "id": batch_id,
        "owner": text["owner"],
        "total": int(text["total"]),
        "counts": counts,
        "done": ended_at is not None,
        "created_at": text["created_at"],
        "ended_at": ended_at,
        "job_ids": job_ids,
        "callback": None if callback is None else {name: callback.get(name) for name in _CALLBACK_SHOWN},
        # Not shown: whether every job shows its end yet (see SETTLE), and the full state.
        "_settled": all(name in _TERMINAL for name, count in counts.items() if count),
        "_callback": callback,
    }


_CALLBACK_SHOWN = ("url", "status", "attempts", "last_error", "delivered_at")


def public(view: dict[str, Any]) -> dict[str, Any]:
    """The view as clients see it: without its owner and bookkeeping."""
    return {name: value for name, value in view.items() if name != "owner" and not name.startswith("_")}


def settle(connection: redis.Redis, batch_id: str, view: dict[str, Any]) -> bool:
    """End a batch whose every job shows its end although no one announced the last (a reader
    saw it so): True when this call ended it."""
    if view["done"] or not view["_settled"]:
        return False
    return _settle(connection, batch_id, view["job_ids"])


def _settle(connection: redis.Redis, batch_id: str, job_ids: list[str]) -> bool:
    with connection.pipeline(transaction=False) as pipe:
        if job_ids:
            pipe.srem(keys.batch_pending(batch_id), *job_ids)
        _queue_end(pipe, batch_id, "")
        ended = pipe.execute()[-1]
    if ended:
        log.info("batch %s ended (found by a look at its jobs)", batch_id)
    return bool(ended)


# ---------------------------------------------------------------------- the sweep


def sweep(connection: redis.Redis, at: float | None = None) -> int:
    """Look at the open batches due for a look: remove their ended jobs from `pending`, end
    those with none left. How many it ended."""
    at = time.time() if at is None else at
    take = connection.register_script(TAKE)
    found = take(keys=[keys.BATCHES_OPEN], args=[at, at + SWEEP_LEASE, SWEEP_BATCHES])
    ended = 0
    for batch_id in (value.decode() for value in found[::2]):
        pending = [job_id.decode() for job_id in connection.smembers(keys.batch_pending(batch_id))]
        with connection.pipeline(transaction=False) as pipe:
            for job_id in pending:
                pipe.hget(Job.key_for(job_id), "status")
            statuses = pipe.execute()
        over = [
            job_id
            for job_id, status in zip(pending, statuses, strict=True)
            if status is None or status.decode() in _TERMINAL
        ]
        if _settle(connection, batch_id, over):
            ended += 1
        else:  # still open (or gone: the end script dropped it): look again later
            connection.zadd(keys.BATCHES_OPEN, {batch_id: time.time() + SWEEP_EVERY}, xx=True)
    return ended
