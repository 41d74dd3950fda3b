"""The document store in Redis: the single source of truth of the search index.

Each document is a hash (text, metadata, revision, integer id). Every change is made by a
Lua script that, in one atomic step, updates the hash and appends the change, with the
vector, to the `INDEX_CHANGES` stream, which search replicas replay; once a snapshot holds
a change, the stream is trimmed behind it, so Redis keeps each vector once. Writes are idempotent and ordered
by revision, the time their request was accepted: a retried job rewrites nothing it already
wrote, and can never undo a change accepted after it.

A delete leaves a tombstone (the id's revision, kept in `INDEX_REVISIONS` after the document
is gone) so that a write accepted before the delete but run after it cannot bring the
document back. Tombstones are forgotten TOMBSTONE_SECONDS after their delete, by the writes
that follow (a few per write, in the same script), so deleted ids do not pile up forever.
The store then remembers one number, the newest forgotten delete's revision (the horizon):
a write to an id it has no record of, from a request accepted before the horizon, may be
the stale write of a forgotten delete, so it is refused ('superseded') like any stale
write. Only requests accepted more than TOMBSTONE_SECONDS before they run can meet that.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis

from jobs import keys
from jobs.times import iso

if TYPE_CHECKING:
    import numpy as np

# How long a delete is remembered by id: longer than a job can wait to run under the default
# settings (MAX_DELAY, 7 days, then a day of retries; RESULT_TTL lets a failed job be retried
# by hand for a day). A write older than that meets the horizon instead (see above).
TOMBSTONE_SECONDS = 8 * 24 * 3600
# Tombstones one write forgets at most, to keep every script short.
FORGET_PER_WRITE = 100

# Forget tombstones older than `cutoff`; the horizon moves up to the newest forgotten one.
_FORGET = """
local function forget_tombstones(revisions, tombstones, config, cutoff)
  local old = redis.call('ZRANGEBYSCORE', tombstones, '-inf', cutoff, 'WITHSCORES', 'LIMIT', 0, {limit})
  if #old == 0 then return end
  local horizon = tonumber(redis.call('HGET', config, 'tombstone_horizon') or '0')
  for j = 1, #old, 2 do
    redis.call('HDEL', revisions, old[j])
    redis.call('ZREM', tombstones, old[j])
    horizon = math.max(horizon, tonumber(old[j + 1]))
  end
  redis.call('HSET', config, 'tombstone_horizon', string.format('%.0f', horizon))
end
""".replace("{limit}", str(FORGET_PER_WRITE))

_UPSERT = (
    _FORGET
    + """
local model, dims = ARGV[1], ARGV[2]
local built_with = redis.call('HGET', KEYS[7], 'model')
if built_with then
  if built_with ~= model or redis.call('HGET', KEYS[7], 'dimensions') ~= dims then
    return redis.error_reply('INDEX_MISMATCH index was built with ' .. built_with)
  end
else
  redis.call('HSET', KEYS[7], 'model', model, 'dimensions', dims, 'epoch', ARGV[4])
end
forget_tombstones(KEYS[1], KEYS[8], KEYS[7], ARGV[5])
local horizon = tonumber(redis.call('HGET', KEYS[7], 'tombstone_horizon') or '-1')
local outcome = {}
for i = 9, #KEYS do
  local at = 5 + (i - 9) * 5
  local id, text, metadata, vector = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
  local revision = tonumber(ARGV[at + 5])
  local current = tonumber(redis.call('HGET', KEYS[1], id) or '-1')
  local exists = redis.call('EXISTS', KEYS[i]) == 1
  if revision < current then
    outcome[#outcome + 1] = 'superseded'
  elseif current < 0 and revision <= horizon then
    -- No record of the id, and accepted before a delete that is forgotten: maybe of this id.
    outcome[#outcome + 1] = 'superseded'
  elseif revision == current and exists then
    outcome[#outcome + 1] = 'indexed'
  else
    local int_id = redis.call('HGET', KEYS[2], id)
    if not int_id then
      int_id = redis.call('INCR', KEYS[3])
      redis.call('HSET', KEYS[2], id, int_id)
    end
    if not exists then redis.call('INCR', KEYS[6]) end
    -- The vector lives in the change entry and then the snapshot, not here: once is enough.
    redis.call('HSET', KEYS[i], 'id', id, 'text', text, 'metadata', metadata,
               'revision', ARGV[at + 5], 'int_id', int_id, 'updated_at', ARGV[3])
    redis.call('HDEL', KEYS[i], 'vector')
    redis.call('HSET', KEYS[1], id, ARGV[at + 5])
    redis.call('ZREM', KEYS[8], id)
    local version = redis.call('INCR', KEYS[5])
    redis.call('XADD', KEYS[4], '*', 'op', 'upsert', 'id', id, 'int_id', int_id,
               'vector', vector, 'metadata', metadata, 'version', version)
    outcome[#outcome + 1] = 'indexed'
  end
end
return outcome
"""
)

_DELETE = (
    _FORGET
    + """
forget_tombstones(KEYS[1], KEYS[7], KEYS[8], ARGV[3])
if redis.call('EXISTS', KEYS[6]) == 0 then return 0 end
local int_id = redis.call('HGET', KEYS[6], 'int_id')
redis.call('DEL', KEYS[6])
redis.call('DECR', KEYS[5])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[7], ARGV[2], ARGV[1])
-- A document written again later gets a new integer id: replicas remove this one now.
redis.call('HDEL', KEYS[2], ARGV[1])
local version = redis.call('INCR', KEYS[4])
redis.call('XADD', KEYS[3], '*', 'op', 'delete', 'id', ARGV[1], 'int_id', int_id, 'version', version)
return 1
"""
)


class IndexMismatchError(Exception):
    """The index was built with another model; its vectors cannot be mixed with these."""


@dataclass
class Document:
    id: str
    text: str
    metadata: dict[str, Any]
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "metadata": self.metadata,
            "updated_at": iso(datetime.fromtimestamp(self.updated_at, UTC)),
        }


def new_revision() -> int:
    """Revisions order changes by when their request was accepted."""
    return time.time_ns()


class DocumentStore:
    def __init__(self, connection: redis.Redis, tombstone_seconds: float = TOMBSTONE_SECONDS) -> None:
        self.connection = connection
        self.tombstone_seconds = tombstone_seconds
        self._upsert = connection.register_script(_UPSERT)
        self._delete = connection.register_script(_DELETE)

    def upsert(
        self, documents: list[dict[str, Any]], vectors: np.ndarray, revision: int | list[int], model: str
    ) -> list[str]:
        """Write documents with their vectors, all or none; per document 'indexed' or 'superseded'.

        `revision` is every document's, or one per document (documents of several requests).
        """
        revisions = revision if isinstance(revision, list) else [revision] * len(documents)
        args: list[Any] = [model, vectors.shape[1], time.time(), uuid.uuid4().hex, self._forget_before()]
        for document, vector, rev in zip(documents, vectors, revisions, strict=True):
            metadata = json.dumps(document.get("metadata") or {}, separators=(",", ":"), sort_keys=True)
            # float16 in the change entry: half the bytes, and the same top 10 (tests/test_index.py).
            args += [document["id"], document["text"], metadata, vector.astype("float16").tobytes(), rev]
        fixed = [
            keys.INDEX_REVISIONS,
            keys.INDEX_INT_IDS,
            keys.INDEX_NEXT_INT_ID,
            keys.INDEX_CHANGES,
            keys.INDEX_VERSION,
            keys.INDEX_COUNT,
            keys.INDEX_CONFIG,
            keys.INDEX_TOMBSTONES,
        ]
        try:
            outcome = self._upsert(keys=fixed + [keys.document(d["id"]) for d in documents], args=args)
        except redis.exceptions.ResponseError as error:
            if "INDEX_MISMATCH" in str(error):
                raise IndexMismatchError(str(error).split("INDEX_MISMATCH ", 1)[-1]) from None
            raise
        return [o.decode() if isinstance(o, bytes) else o for o in outcome]

    def delete(self, doc_id: str, revision: int | None = None) -> bool:
        """Remove a document; False when there is none."""
        revision = new_revision() if revision is None else revision
        removed = self._delete(
            keys=[
                keys.INDEX_REVISIONS,
                keys.INDEX_INT_IDS,
                keys.INDEX_CHANGES,
                keys.INDEX_VERSION,
                keys.INDEX_COUNT,
                keys.document(doc_id),
                keys.INDEX_TOMBSTONES,
                keys.INDEX_CONFIG,
            ],
            args=[doc_id, revision, self._forget_before()],
        )
        return bool(removed)

    def _forget_before(self) -> int:
        """The revision before which tombstones are forgotten now."""
        return new_revision() - int(self.tombstone_seconds * 1_000_000_000)

    def get(self, doc_id: str) -> Document | None:
        text, metadata, updated_at = self.connection.hmget(
            keys.document(doc_id), "text", "metadata", "updated_at"
        )
        if text is None:
            return None
        return Document(doc_id, text.decode(), json.loads(metadata), float(updated_at))

    def get_many(self, doc_ids: list[str]) -> list[Document | None]:
        with self.connection.pipeline(transaction=False) as pipe:
            for doc_id in doc_ids:
                pipe.hmget(keys.document(doc_id), "text", "metadata", "updated_at")
            rows = pipe.execute()
        return [
            Document(doc_id, text.decode(), json.loads(metadata), float(updated_at))
            if text is not None
            else None
            for doc_id, (text, metadata, updated_at) in zip(doc_ids, rows, strict=True)
        ]

    def stats(self) -> dict[str, Any]:
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.get(keys.INDEX_COUNT)
            pipe.get(keys.INDEX_VERSION)
            pipe.hgetall(keys.INDEX_CONFIG)
            pipe.hmget(keys.INDEX_SNAPSHOT, "version", "documents", "kind", "created_at", "epoch")
            count, version, config, (snap_version, snap_documents, kind, created_at, epoch) = pipe.execute()
        snapshot = None
        if snap_version is not None and epoch == config.get(b"epoch"):
            snapshot = {
                "version": int(snap_version),
                "documents": int(snap_documents),
                "search": "approximate" if kind == b"hnsw" else "exact",
                "created_at": iso(datetime.fromtimestamp(float(created_at), UTC)),
            }
        return {
            "documents": int(count or 0),
            "version": int(version or 0),
            "model": config.get(b"model", b"").decode() or None,
            "dimensions": int(config[b"dimensions"]) if b"dimensions" in config else None,
            "snapshot": snapshot,
        }
