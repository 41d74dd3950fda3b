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

# Drops the lapsed entries of KEYS (the key's waiting set, its sizes hash) at ARGV[1] (now).
_DROP_LAPSED = """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, id in ipairs(lapsed) do
  local size = redis.call('HGET', KEYS[2], id)
  if size then
    redis.call('HINCRBY', KEYS[2], '', -tonumber(size))
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
"""

# KEYS: the key's waiting set, its sizes hash (field "" holds the total).
# ARGV: now, job id, bytes, when the entry lapses, most jobs, most bytes.
# Returns {admitted (1/0), jobs waiting, bytes waiting}.
_RESERVE = (
    _DROP_LAPSED
    + """
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
)

# Many jobs at once, all or none (a batch). ARGV: now, when the entries lapse, most jobs, most
# bytes, then each job's id and bytes. Returns what _RESERVE does.
_RESERVE_MANY = (
    _DROP_LAPSED
    + """
local count = redis.call('ZCARD', KEYS[1])
local total = tonumber(redis.call('HGET', KEYS[2], '') or '0')
local added, size = (#ARGV - 4) / 2, 0
for i = 6, #ARGV, 2 do size = size + tonumber(ARGV[i]) end
if count + added > tonumber(ARGV[3]) or total + size > tonumber(ARGV[4]) then
  return {0, count, total}
end
for i = 5, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[2], '', size)
return {1, count + added, total + size}
"""
)

# KEYS: the key's waiting set, its sizes hash. ARGV: job ids.
_RELEASE = """
for _, id in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local size = redis.call('HGET', KEYS[2], id)
    if size then
      redis.call('HINCRBY', KEYS[2], '', -tonumber(size))
      redis.call('HDEL', KEYS[2], id)
    end
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


def reserve_many(
    pipe: Any,
    owner: str,
    sizes: dict[str, int],
    now: float,
    lapses_at: float,
    jobs: int,
    size_limit: int,
) -> None:
    """Queue the reservation of a place for every job in `sizes` (id -> bytes) on `pipe`: all
    of them, or none when they do not all fit (nothing to release then)."""
    places = [part for job_id, size in sizes.items() for part in (job_id, size)]
    pipe.eval(
        _RESERVE_MANY,
        2,
        keys.waiting(owner),
        keys.waiting_sizes(owner),
        now,
        lapses_at,
        jobs,
        size_limit,
        *places,
    )


def release_many(pipe: Any, owner: str, job_ids: list[str]) -> None:
    """Queue the release of every place of `job_ids` on `pipe` (those holding none are skipped)."""
    pipe.eval(_RELEASE, 2, keys.waiting(owner), keys.waiting_sizes(owner), *job_ids)
