"""What every completion webhook keeps in Redis, a job's and a batch's alike: its delivery
state, and its entry in the due set (keys.CALLBACKS: entry -> when to look next), which the
webhook senders take with a lease (jobs.webhook_sender)."""

from __future__ import annotations

from typing import Any

PENDING, RETRYING, DELIVERED, FAILED, REFUSED = "pending", "retrying", "delivered", "failed", "refused"
FINAL = frozenset({DELIVERED, FAILED, REFUSED})

# CALLBACKS entries that are batches' ends (jobs.batches), not jobs: this, then the batch id.
BATCH_ENTRY = "batch:"

# Take up to ARGV[3] entries due at ARGV[1], leasing each until ARGV[2]; each id with the
# score it had (0: its job's end was announced).
TAKE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
for i = 1, #due, 2 do redis.call('ZADD', KEYS[1], ARGV[2], due[i]) end
return due
"""


def initial_state(url: str) -> dict[str, Any]:
    """A callback's delivery state before its first attempt."""
    return {"url": url, "status": PENDING, "attempts": 0, "last_error": None, "delivered_at": None}
