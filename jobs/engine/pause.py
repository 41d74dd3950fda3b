"""Pausing one queue: workers take no job off it until it is resumed.

A paused queue is one key (jobs.keys.paused) that the take script (jobs.engine.fair's
`TAKE`) checks in the same atomic step that would move a job off the queue: once `pause`
has returned, no worker takes a job from it, and a job taken before goes on to run and end
as usual. Everything else is untouched: submissions are accepted and queued, the scheduler
queues due jobs onto it, a maintenance round puts an abandoned job back on it; they all
wait there. `resume` deletes the key and pushes one wake-up signal per job waiting on
it, so that idle workers take them at once rather than at their next one-second look.

RQ's own `rq suspend` is no substitute: it stops every worker of the Redis database (a
flag each worker reads between jobs), not the workers' take from one queue, and a worker
that serves several queues can only stop altogether.
"""

from __future__ import annotations

import json
from typing import Any

from rq.queue import Queue as RQQueue

from jobs import keys
from jobs.engine import fair
from jobs.times import iso, now

# Delete the pause key and push one wake-up signal per job on the queue (up to its limit).
# KEYS: pause, queue, wake-up list. ARGV: wake-up limit.
_RESUME = """
redis.call('DEL', KEYS[1])
local signals = math.min(redis.call('LLEN', KEYS[2]), tonumber(ARGV[1]))
for _ = 1, signals do redis.call('LPUSH', KEYS[3], 1) end
if signals > 0 then redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[1]) - 1) end
return signals
"""


def pause(connection: Any, queue: str, by: str) -> dict[str, Any]:
    """Pause `queue` on behalf of `by` (an owner name, never a key); pausing a paused queue
    changes nothing. Returns its state."""
    record = json.dumps({"paused_at": iso(now()), "paused_by": by})
    with connection.pipeline() as pipe:
        pipe.set(keys.paused(queue), record, nx=True)
        pipe.get(keys.paused(queue))
        _, stored = pipe.execute()
    return state(queue, stored)


def resume(connection: Any, queue: str) -> dict[str, Any]:
    """Let workers take `queue`'s jobs again, and wake idle ones; resuming a running queue
    changes nothing. Returns its state."""
    connection.eval(
        _RESUME,
        3,
        keys.paused(queue),
        RQQueue.redis_queue_namespace_prefix + queue,
        keys.wakeup_list(queue),
        fair.WAKEUP_LIMIT,
    )
    return state(queue, None)


def read(connection: Any, queue: str) -> dict[str, Any]:
    """`queue`'s state, as `pause` and `resume` answer it."""
    return state(queue, connection.get(keys.paused(queue)))


def state(queue: str, stored: bytes | str | None) -> dict[str, Any]:
    """A queue's state from the value of its pause key (None: not paused)."""
    record = json.loads(stored) if stored else {}
    return {
        "name": queue,
        "paused": bool(stored),
        "paused_at": record.get("paused_at"),
        "paused_by": record.get("paused_by"),
    }
