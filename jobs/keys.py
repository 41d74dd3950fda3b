"""Every Redis key and channel name Afterward uses besides RQ's own `rq:` keys."""

from __future__ import annotations

import hashlib

PREFIX = "afterward:"

# Pub/sub channel a job's id is published on whenever the job reaches an end state.
JOB_EVENTS_CHANNEL = PREFIX + "job-events"

# Sorted set of job ids by creation time (score), per owner: the `GET /jobs` listing.
_RECENT_JOBS = PREFIX + "jobs:recent:{owner}"
# Each API key's waiting jobs and their sizes (jobs.quota).
_WAITING = PREFIX + "quota:waiting:{owner}"
_WAITING_SIZES = PREFIX + "quota:waiting-bytes:{owner}"

# Remembered idempotency keys, per owner and key digest.
_IDEMPOTENCY = PREFIX + "idempotency:{owner}:{digest}"

# The wake-up list: one per queue, which idle workers of that queue block on; every push of a
# job id adds a signal to it. Its name in Redis stays `doorbell:<queue>`: workers of an
# earlier release, during a rolling upgrade, still block on it.
_WAKEUP = PREFIX + "doorbell:{queue}"

# Fair share (jobs.engine.fair), per RQ queue: each owner's one job on the queue (owner -> job
# id), each owner's jobs waiting behind it (a list per owner: the prefix and the owner), the
# owners with any waiting, and how many jobs wait in all.
_FAIR = PREFIX + "fair:{queue}:"

# The rate limiter's counter of one client (API key owner or address) in one fixed window.
_RATE_LIMIT = PREFIX + "rate-limits:{seconds}:{window}:{who}"

# Jobs with a completion webhook, by when a webhook sender should look at them next (jobs.callbacks).
CALLBACKS = PREFIX + "callbacks"
# Pub/sub channel a job's id is published on when its callback becomes due: wakes every webhook sender.
CALLBACKS_CHANNEL = PREFIX + "callbacks-due"

# Written by a request just before its WAIT (REDIS_MIN_REPLICAS), on the request's connection,
# so that WAIT covers everything the request wrote or read first (jobs.replication).
REPLICATION_MARK = PREFIX + "replication-mark"

# Fields RQ's job hash is extended with: how many times a worker started the job; the owner
# whose fair share the job runs in, and the most jobs of that owner it may run beside
# (KEY_MAX_ACTIVE when the job was accepted).
JOB_ATTEMPTS_FIELD = "afterward_attempts"
JOB_OWNER_FIELD = "afterward_owner"
JOB_MAX_ACTIVE_FIELD = "afterward_max_active"


def recent_jobs(owner: str) -> str:
    return _RECENT_JOBS.format(owner=owner)


def search_spent(owner: str, window: int) -> str:
    """Search cost units `owner` spent in the minute `window` (minutes since the epoch)."""
    return f"{PREFIX}quota:search:{owner}:{window}"


def waiting(owner: str) -> str:
    return _WAITING.format(owner=owner)


def waiting_sizes(owner: str) -> str:
    return _WAITING_SIZES.format(owner=owner)


def rate_limit(who: str, seconds: int, window: int) -> str:
    return _RATE_LIMIT.format(seconds=seconds, window=window, who=who)


def idempotency(owner: str, key: str) -> str:
    # Hashing keeps arbitrary client-chosen bytes and lengths out of key names.
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return _IDEMPOTENCY.format(owner=owner, digest=digest)


def wakeup_list(queue: str) -> str:
    return _WAKEUP.format(queue=queue)


def fair_front(queue: str) -> str:
    return _FAIR.format(queue=queue) + "front"


def fair_waiting_prefix(queue: str) -> str:
    return _FAIR.format(queue=queue) + "waiting:"


def fair_owners(queue: str) -> str:
    return _FAIR.format(queue=queue) + "owners"


def fair_waiting_count(queue: str) -> str:
    return _FAIR.format(queue=queue) + "waiting-count"


# Jobs stopped (RQ keeps them in its failed registry), per queue, scored like that registry
# (when they expire): GET /queues counts them apart without reading the failed jobs.
_STOPPED = PREFIX + "stopped:{queue}"
# Each owner's failed and stopped jobs, scored by when they ended: what a bulk retry reads.
_RETRYABLE = PREFIX + "retryable:{owner}:{status}"


def stopped(queue: str) -> str:
    return _STOPPED.format(queue=queue)


def retryable(owner: str, status: str) -> str:
    return _RETRYABLE.format(owner=owner, status=status)


# ---------------------------------------------------------------- the document index
# Redis holds the truth: one hash per document, and a stream of every change that search
# replicas replay. See jobs/index/.

_DOCUMENT = PREFIX + "doc:{id}"
# id -> revision of its latest upsert or delete (a stale retry cannot undo a newer change).
# A deleted id's entry is its tombstone, forgotten after a while (jobs/index/store.py).
INDEX_REVISIONS = PREFIX + "index:revisions"
# Deleted ids scored by their delete's revision: which tombstones are old enough to forget.
INDEX_TOMBSTONES = PREFIX + "index:tombstones"
# id -> the integer id FAISS knows the document by, while the document exists.
INDEX_INT_IDS = PREFIX + "index:int-ids"
INDEX_NEXT_INT_ID = PREFIX + "index:next-int-id"
# Every upsert and delete, in order: op, id, int id, vector, metadata, version.
INDEX_CHANGES = PREFIX + "index:changes"
# Number of changes applied so far: the index version.
INDEX_VERSION = PREFIX + "index:version"
INDEX_COUNT = PREFIX + "index:count"
# owner -> how many documents it stores, and their bytes of text and metadata (the caps'
# running counts, kept by the store's scripts).
INDEX_OWNER_DOCUMENTS = PREFIX + "index:owner-documents"
INDEX_OWNER_BYTES = PREFIX + "index:owner-bytes"
# Model name and vector size the index was built with; the newest forgotten delete's revision.
INDEX_CONFIG = PREFIX + "index:config"
# The latest snapshot of a replica (FAISS index bytes in chunks, documents, stream position).
INDEX_SNAPSHOT = PREFIX + "index:snapshot"
INDEX_SNAPSHOT_LOCK = PREFIX + "index:snapshot-lock"
# A snapshot being written, renamed over INDEX_SNAPSHOT when whole.
INDEX_SNAPSHOT_STAGING = PREFIX + "index:snapshot-staging"


def document(doc_id: str) -> str:
    return _DOCUMENT.format(id=doc_id)


# ---------------------------------------------------------------- metrics (jobs.metrics)

# "event|type|queue" -> count, for accepted, finished, failed and retried jobs.
METRICS_COUNTERS = PREFIX + "metrics:counters"
_METRICS_HISTOGRAM = PREFIX + "metrics:histogram:{name}"


def metrics_histogram(name: str) -> str:
    return _METRICS_HISTOGRAM.format(name=name)


# ---------------------------------------------------------------- recurring schedules (jobs.schedules)

# One hash per schedule: its job request, its timing and what its ticks did.
_SCHEDULE = PREFIX + "schedule:{id}"
# Each owner's schedule ids (a set): GET /schedules and the KEY_MAX_SCHEDULES cap.
_OWNER_SCHEDULES = PREFIX + "schedules:{owner}"
# Active (not paused) schedule ids scored by their next tick (Unix time): what the ticker reads.
SCHEDULES_DUE = PREFIX + "schedules-due"
# The ticker's leader lock: which worker process ticks, "host:pid:token", renewed while it lives.
SCHEDULES_TICKER = PREFIX + "schedules-ticker"


def schedule(schedule_id: str) -> str:
    return _SCHEDULE.format(id=schedule_id)


def owner_schedules(owner: str) -> str:
    return _OWNER_SCHEDULES.format(owner=owner)


# A queue an operator paused (POST /queues/<name>/pause): JSON of when and by whom. While it
# exists workers take no job off that queue (jobs.engine.fair's TAKE skips it).
_PAUSED = PREFIX + "paused:{queue}"


def paused(queue: str) -> str:
    return _PAUSED.format(queue=queue)


# ---------------------------------------------------------------- batches (jobs.batches)

# A batch: its hash (owner, total, created_at, ended_at, callback), its job ids in order, and
# the ids of those not ended yet.
_BATCH = PREFIX + "batch:{id}"
# Open batches, by when a sweep should look at them next (an end no one announced).
BATCHES_OPEN = PREFIX + "batches:open"


def batch(batch_id: str) -> str:
    return _BATCH.format(id=batch_id)


def batch_jobs(batch_id: str) -> str:
    return _BATCH.format(id=batch_id) + ":jobs"


def batch_pending(batch_id: str) -> str:
    return _BATCH.format(id=batch_id) + ":pending"
