"""Fair share: when several API keys have jobs waiting, workers take turns between them.

A plain queue is first come, first served: a key that submits ten thousand jobs holds every
worker until they are done. RQ's `RateLimit` caps a key's queued and running jobs instead,
which holds a key back even when it is alone (the common case: one backend calling the
service). Here the order jobs are taken in is fair, and nothing is capped:

- **One job per key on the queue.** Each RQ queue list holds at most one job of each key
  (its front); the key's further jobs wait in a list of their own, in order. When a worker
  takes a key's front job, the key's next job joins the end of the queue. So the queue is a
  rotation of keys, and a job of a new key waits for at most one job of each other key.
- **The fewest running first.** A worker looks at the jobs near the head of its queues and
  takes one of the key with the fewest jobs running in its process type (started with a live
  heartbeat, or taken and about to start), the higher priority and the older first among
  equals. While n keys have jobs waiting, no key runs more than ceil(workers / n) of them, once
  the jobs it started while the others had nothing waiting have ended: a key alone may use
  every worker, and an embedder fills its batch from one key when only one has work. A job
  that dies with its worker stops counting once its heartbeat lapses.
- **A cap, when asked for.** With KEY_MAX_ACTIVE set, a job runs only while fewer than that
  many jobs of its key run; the cap is the one in force when the job was accepted, recorded
  on the job.

Jobs without an owner (no API_KEYS: one tenant) are queued as RQ queues them. Everything a
change of state needs is done in the same Lua script or transaction as the change itself:
a submission (`admit`), a take (`TAKE`), a cancel or delete (`forget`); a maintenance round
(`repair`) moves on a key whose front job was removed behind RQ's back. A take passes over a
queue an operator paused (jobs.engine.pause).
"""

from __future__ import annotations

from typing import Any

from rq.queue import Queue as RQQueue
from rq.serializers import JSONSerializer

from jobs import keys

# Jobs at the head of each queue a worker considers: one per key with work, in the usual case.
SCAN = 100
# Wake-up signals kept while no worker listens (jobs.engine.queue).
WAKEUP_LIMIT = 1000

# Shared by the scripts below. `promote` moves the owner's next waiting job (skipping any
# canceled or deleted meanwhile) to the end of the queue as its front, and signals an idle worker.
_PROMOTE = """
local function promote(queue, front, owners, count, wakeup, waiting_prefix, owner, prefix, wakeup_limit)
  local waiting = waiting_prefix .. owner
  while true do
    local id = redis.call('LPOP', waiting)
    if not id then
      redis.call('HDEL', front, owner)
      redis.call('SREM', owners, owner)
      return false
    end
    redis.call('DECR', count)
    if redis.call('HGET', prefix .. id, 'status') == 'queued' then
      redis.call('RPUSH', queue, id)
      redis.call('HSET', front, owner, id)
      redis.call('LPUSH', wakeup, 1)
      redis.call('LTRIM', wakeup, 0, wakeup_limit - 1)
      return id
    end
  end
end
"""

# Push a job: behind its owner's front when that front is still waiting on the queue, else as
# the front. KEYS: queue, front, owners, count, wake-up list.
# ARGV: job id, at front (1/0), job key prefix, waiting prefix, wake-up limit.
_ADMIT = (
    _PROMOTE
    + """
local id, prefix = ARGV[1], ARGV[3]
local owner = redis.call('HGET', prefix .. id, 'afterward_owner')
local front = owner and redis.call('HGET', KEYS[2], owner)
if ARGV[2] ~= '1' and owner and front ~= id then
  local waiting = ARGV[4] .. owner
  local live = front and redis.call('HGET', prefix .. front, 'status') == 'queued'
  if live or redis.call('LLEN', waiting) > 0 then
    redis.call('RPUSH', waiting, id)
    redis.call('SADD', KEYS[3], owner)
    redis.call('INCR', KEYS[4])
    if not live then
      -- Its front left the queue unannounced: the oldest waiting job takes its place.
      promote(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[4], owner, prefix, tonumber(ARGV[5]))
    end
    return 0
  end
  redis.call('HSET', KEYS[2], owner, id)
end
if ARGV[2] == '1' then redis.call('LPUSH', KEYS[1], id) else redis.call('RPUSH', KEYS[1], id) end
redis.call('LPUSH', KEYS[5], 1)
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[5]) - 1)
return 1
"""
)

# A job was canceled or deleted: if it was its owner's front, the owner's next job takes its
# place; if it was waiting behind it, it leaves that list. KEYS: queue, front, owners, count,
# wake-up list. ARGV: job id, owner, job key prefix, waiting prefix, wake-up limit.
_FORGET = (
    _PROMOTE
    + """
local id, owner = ARGV[1], ARGV[2]
if redis.call('HGET', KEYS[2], owner) == id then
  promote(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[4], owner, ARGV[3], tonumber(ARGV[5]))
  return 1
end
local waiting = ARGV[4] .. owner
if redis.call('LREM', waiting, 1, id) > 0 then
  redis.call('DECR', KEYS[4])
  if redis.call('LLEN', waiting) == 0 then redis.call('SREM', KEYS[3], owner) end
end
return 0
"""
)

# Maintenance: every owner with jobs waiting whose front is gone from the queue (deleted or
# canceled behind the engine's back) gets its next job queued. Same KEYS; ARGV: job key
# prefix, waiting prefix, wake-up limit.
_REPAIR = (
    _PROMOTE
    + """
local repaired = 0
for _, owner in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local front = redis.call('HGET', KEYS[2], owner)
  if not front or redis.call('HGET', ARGV[1] .. front, 'status') ~= 'queued' then
    promote(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[2], owner, ARGV[1], tonumber(ARGV[3]))
    repaired = repaired + 1
  end
end
return repaired
"""
)

# Delete the jobs waiting behind the fronts of a queue being emptied. KEYS: front, owners,
# count. ARGV: job key prefix, waiting prefix.
_EMPTY = """
local deleted = 0
for _, owner in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  for _, id in ipairs(redis.call('LRANGE', ARGV[2] .. owner, 0, -1)) do
    redis.call('DEL', ARGV[1] .. id, ARGV[1] .. id .. ':dependents')
    deleted = deleted + 1
  end
  redis.call('DEL', ARGV[2] .. owner)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return deleted
"""

# Take up to ARGV[1] jobs (fewer once their data passes ARGV[2] bytes) off the first of the
# worker's queues that has one it may run, moving each onto that queue's intermediate list,
# and return the queue's key and each id with its job hash. A queue whose pause key exists
# (jobs.engine.pause) is passed over: its jobs stay queued. Per queue, KEYS: queue,
# intermediate list, started registry, front, owners, count, wake-up list, pause (PER of them).
# ARGV: most, budget, job key prefix, now, scan, wake-up limit, then each queue's waiting prefix.
TAKE = (
    _PROMOTE
    + """
local PER = 8
local n = #KEYS / PER
local most, budget, prefix, now = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local scan, wakeup_limit = tonumber(ARGV[5]), tonumber(ARGV[6])

local function owner_of(id)
  return redis.call('HGET', prefix .. id, 'afterward_owner') or ''
end

local function candidate(id, queue_index, position)
  local fields = redis.call('HMGET', prefix .. id, 'afterward_owner', 'afterward_max_active')
  return {id = id, owner = fields[1] or '', cap = tonumber(fields[2]), q = queue_index, at = position}
end

-- A taken job's hash, and the size of its data (a batch stops growing past ARGV[2] bytes).
local function read(id)
  local hash = redis.call('HGETALL', prefix .. id)
  local size = 0
  for j = 1, #hash, 2 do
    if hash[j] == 'data' then size = #hash[j + 1] end
  end
  return hash, size
end

-- Nothing to take: the wake-up signals waiting on these queues' lists are stale (every job
-- they announced has been taken, or waits on a pause or a cap whose end signals anew), and
-- they go in the same step, or an idle worker would spin through them, a take and a wait each.
local function nothing()
  for i = 1, n do redis.call('DEL', KEYS[i * PER - 1]) end
  return false
end

-- Queues an operator paused give no job; their jobs wait, and those running run on.
local open = {}
for i = 1, n do open[i] = redis.call('EXISTS', KEYS[i * PER]) == 0 end

-- No key has a job on these queues (no API_KEYS): first come, first served, as RQ takes them.
local shared = false
for i = 1, n do
  if redis.call('EXISTS', KEYS[(i - 1) * PER + 4]) == 1 then shared = true end
end
if not shared then
  for i = 1, n do
    local base = (i - 1) * PER
    local id = open[i] and redis.call('LMOVE', KEYS[base + 1], KEYS[base + 2], 'LEFT', 'RIGHT')
    if id then
      local taken, count, size = {KEYS[base + 1]}, 0, 0
      while id do
        local hash, bytes = read(id)
        taken[#taken + 1] = id
        taken[#taken + 1] = hash
        count, size = count + 1, size + bytes
        if count >= most or size >= budget then break end
        id = redis.call('LMOVE', KEYS[base + 1], KEYS[base + 2], 'LEFT', 'RIGHT')
      end
      return taken
    end
  end
  return nothing()
end

local candidates, owners = {}, {}
for i = 1, n do
  for position, id in ipairs(open[i] and redis.call('LRANGE', KEYS[(i - 1) * PER + 1], 0, scan - 1) or {}) do
    local c = candidate(id, i, position)
    candidates[#candidates + 1] = c
    owners[c.owner] = true
  end
end
if #candidates == 0 then return nothing() end

-- Jobs running per owner in this process type: started, with a live heartbeat, or taken. Not
-- needed to choose between the jobs of one owner, unless a cap may hold them back.
local running, capped, distinct = {}, false, 0
for _, c in ipairs(candidates) do capped = capped or c.cap ~= nil end
for _ in pairs(owners) do distinct = distinct + 1 end
for i = 1, (distinct > 1 or capped) and n or 0 do
  local base = (i - 1) * PER
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[base + 3], '(' .. now, '+inf')) do
    local owner = owner_of(string.match(member, '^(.*):[^:]*$') or member)
    running[owner] = (running[owner] or 0) + 1
  end
  for _, id in ipairs(redis.call('LRANGE', KEYS[base + 2], 0, -1)) do
    local owner = owner_of(id)
    running[owner] = (running[owner] or 0) + 1
  end
end

-- The job of the owner with the fewest running, then the higher priority, then the older.
local function best(only_queue)
  local chosen, key = nil, nil
  for index, c in ipairs(candidates) do
    local r = running[c.owner] or 0
    if (only_queue == nil or c.q == only_queue) and (c.cap == nil or r < c.cap) then
      local better = chosen == nil or r < key[1]
        or (r == key[1] and (c.q < key[2] or (c.q == key[2] and c.at < key[3])))
      if better then chosen, key = index, {r, c.q, c.at} end
    end
  end
  return chosen
end

local taken, count, size, queue_index, last = {}, 0, 0, nil, 0
while count < most and (count == 0 or size < budget) do
  local index = best(queue_index)
  if index == nil then break end
  local c = table.remove(candidates, index)
  queue_index = c.q
  local base = (c.q - 1) * PER
  redis.call('LREM', KEYS[base + 1], 1, c.id)
  redis.call('RPUSH', KEYS[base + 2], c.id)
  local hash, bytes = read(c.id)
  taken[#taken + 1] = c.id
  taken[#taken + 1] = hash
  count, size = count + 1, size + bytes
  running[c.owner] = (running[c.owner] or 0) + 1
  if c.owner ~= '' and redis.call('HGET', KEYS[base + 4], c.owner) == c.id then
    local next_id = promote(KEYS[base + 1], KEYS[base + 4], KEYS[base + 5], KEYS[base + 6], KEYS[base + 7],
                            ARGV[6 + c.q], c.owner, prefix, wakeup_limit)
    if next_id then
      last = last + 1
      candidates[#candidates + 1] = candidate(next_id, c.q, scan + last)
    end
  end
end
if count == 0 then return nothing() end
table.insert(taken, 1, KEYS[(queue_index - 1) * PER + 1])
return taken
"""
)


def queue_keys(queue: str) -> list[str]:
    """KEYS of the admit, forget and repair scripts for the RQ queue named `queue`: queue,
    front, owners, count, wake-up list."""
    return [
        RQQueue.redis_queue_namespace_prefix + queue,
        keys.fair_front(queue),
        keys.fair_owners(queue),
        keys.fair_waiting_count(queue),
        keys.wakeup_list(queue),
    ]


def take_keys(queue: Any, started_registry_key: str) -> list[str]:
    """The TAKE script's KEYS for one queue, in its order."""
    return [
        queue.key,
        queue.intermediate_queue_key,
        started_registry_key,
        keys.fair_front(queue.name),
        keys.fair_owners(queue.name),
        keys.fair_waiting_count(queue.name),
        keys.wakeup_list(queue.name),
        keys.paused(queue.name),
    ]


def admit(pipe: Any, queue: Any, job_id: str, at_front: bool, job_prefix: str) -> None:
    """Queue the push of `job_id` onto `queue`, fairly, on `pipe` (EVAL: no script round trip)."""
    pipe.eval(
        _ADMIT,
        5,
        *queue_keys(queue.name),
        job_id,
        "1" if at_front else "0",
        job_prefix,
        keys.fair_waiting_prefix(queue.name),
        WAKEUP_LIMIT,
    )


def forget(client: Any, queue: str, job_id: str, owner: str, job_prefix: str) -> None:
    """`job_id`, canceled or deleted off the RQ queue named `queue`, no longer holds its
    owner's place (on `client`, a connection or a pipeline)."""
    client.eval(
        _FORGET,
        5,
        *queue_keys(queue),
        job_id,
        owner,
        job_prefix,
        keys.fair_waiting_prefix(queue),
        WAKEUP_LIMIT,
    )


def repair(connection: Any, queue: Any, job_prefix: str) -> int:
    """Queue the next job of every owner whose front job left the queue unannounced; how many."""
    return int(
        connection.eval(
            _REPAIR,
            5,
            *queue_keys(queue.name),
            job_prefix,
            keys.fair_waiting_prefix(queue.name),
            WAKEUP_LIMIT,
        )
    )


def empty(connection: Any, queue: Any, job_prefix: str) -> int:
    """Delete the jobs waiting behind `queue`'s fronts; how many."""
    return int(
        connection.eval(
            _EMPTY,
            3,
            keys.fair_front(queue.name),
            keys.fair_owners(queue.name),
            keys.fair_waiting_count(queue.name),
            job_prefix,
            keys.fair_waiting_prefix(queue.name),
        )
    )


class FairQueue(RQQueue):
    """RQ's queue, JSON only, whose every push goes through the fair share (`admit`) and signals
    an idle worker. The engine's Queue (jobs.engine.queue) is one; settling a dependent
    (jobs.engine.dependencies) pushes through one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["serializer"] = JSONSerializer
        super().__init__(*args, **kwargs)

    def push_job_id(self, job_id: str, pipeline: Any = None, at_front: bool = False) -> None:
        # Fairly between keys, signalling an idle worker, in one step.
        admit(
            pipeline if pipeline is not None else self.connection,
            self,
            job_id,
            at_front,
            self.job_class.redis_job_namespace_prefix,
        )
