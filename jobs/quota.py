"""Each API key's share of Redis: how many jobs it may have waiting, and how many bytes.

A key's waiting jobs (queued, rate-limited, scheduled) are counted in a sorted set per key,
with the request's size in a hash beside it. A submission reserves its place in the same
round trip as its rate-limit hit (a script: lapsed entries are dropped, then the job is
admitted or refused); a job leaves when a worker starts it or a client cancels it. An entry
lapses on its own after the longest a job can wait (`MAX_DELAY` + `RESULT_TTL`), so nothing
a crash leaves behind counts for ever.
"""

from __future__ import annotations

from typing import Any

from jobs import keys

# KEYS: the key's waiting set, its sizes hash (field "" holds the total).
# ARGV: now, job id, bytes, when the entry lapses, most jobs, most bytes.
# Returns {admitted (1/0), jobs waiting, bytes waiting}.
_RESERVE = """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, id in ipairs(lapsed) do
  local size = redis.call('HGET', KEYS[2], id)
  if size then
    redis.call('HINCRBY', KEYS[2], '', -tonumber(size))
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
local count = redis.call('ZCARD', KEYS[1])
local total = tonumber(redis.call('HGET', KEYS[2], '') or '0')
if count + 1 > tonumber(ARGV[5]) or total + tonumber(ARGV[3]) > tonumber(ARGV[6]) then
  return {0, count, total}
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[2], '', ARGV[3])
return {1, count + 1, total + tonumber(ARGV[3])}
"""

# KEYS: the key's waiting set, its sizes hash. ARGV: job id.
_RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local size = redis.call('HGET', KEYS[2], ARGV[1])
  if size then
    redis.call('HINCRBY', KEYS[2], '', -tonumber(size))
    redis.call('HDEL', KEYS[2], ARGV[1])
  end
end
return 0
"""

# The job meta field that says the job holds a place in its key's share.
META_FIELD = "waiting_quota"


def reserve(
    pipe: Any, owner: str, job_id: str, size: int, now: float, lapses_at: float, jobs: int, size_limit: int
) -> None:
    """Queue the reservation of `job_id`'s place on `pipe` (EVAL: no script round trip)."""
    pipe.eval(
        _RESERVE,
        2,
        keys.waiting(owner),
        keys.waiting_sizes(owner),
        now,
        job_id,
        size,
        lapses_at,
        jobs,
        size_limit,
    )


def release(pipe: Any, owner: str, job_id: str) -> None:
    """Queue the release of `job_id`'s place on `pipe` (a no-op if it holds none)."""
    pipe.eval(_RELEASE, 2, keys.waiting(owner), keys.waiting_sizes(owner), job_id)
