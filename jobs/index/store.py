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

Every document belongs to an owner (jobs.index.owners), recorded in its hash: the scripts
refuse ('refused') another owner's write or delete of it, and keep each owner's running
count of documents and of their bytes of text and metadata, which the upsert holds to the
owner's caps ('quota_exceeded': not written) in the same atomic step, whatever was accepted.
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
from jobs.index import owners
from jobs.times import iso

if TYPE_CHECKING:
    import numpy as np

    from jobs.settings import Settings

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

# KEYS: revisions, int ids, next int id, changes, version, count, config, tombstones, owners'
# document counts, owners' byte counts, then each document's hash.
# ARGV: model, dimensions, now, epoch, forget-before, most documents and most bytes an owner
# may store (0: no cap), the uncapped owner (`public`), then per document: stored id, text,
# metadata, vector, revision, owner.
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
local max_documents, max_bytes, uncapped = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local outcome = {}
for i = 11, #KEYS do
  local at = 8 + (i - 11) * 6
  local id, text, metadata, vector = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
  local revision, owner = tonumber(ARGV[at + 5]), ARGV[at + 6]
  local current = tonumber(redis.call('HGET', KEYS[1], id) or '-1')
  local exists = redis.call('EXISTS', KEYS[i]) == 1
  -- Documents written before owners have none: they are the uncapped owner's, and uncounted.
  local holder = exists and redis.call('HGET', KEYS[i], 'owner')
  local size = #text + #metadata
  local before = 0
  if holder then
    before = redis.call('HSTRLEN', KEYS[i], 'text') + redis.call('HSTRLEN', KEYS[i], 'metadata')
  end
  local over = false
  if owner ~= uncapped then
    local documents = tonumber(redis.call('HGET', KEYS[9], owner) or '0')
    local bytes = tonumber(redis.call('HGET', KEYS[10], owner) or '0')
    over = (max_documents > 0 and not holder and documents + 1 > max_documents)
      or (max_bytes > 0 and size > before and bytes - before + size > max_bytes)
  end
  if exists and (holder or uncapped) ~= owner then
    outcome[#outcome + 1] = 'refused'  -- another owner's document (INDEX_SCOPE=shared)
  elseif revision < current then
    outcome[#outcome + 1] = 'superseded'
  elseif current < 0 and revision <= horizon then
    -- No record of the id, and accepted before a delete that is forgotten: maybe of this id.
    outcome[#outcome + 1] = 'superseded'
  elseif revision == current and exists then
    outcome[#outcome + 1] = 'indexed'
  elseif over then
    outcome[#outcome + 1] = 'quota_exceeded'
  else
    local int_id = redis.call('HGET', KEYS[2], id)
    if not int_id then
      int_id = redis.call('INCR', KEYS[3])
      redis.call('HSET', KEYS[2], id, int_id)
    end
    if not exists then redis.call('INCR', KEYS[6]) end
    if not holder then redis.call('HINCRBY', KEYS[9], owner, 1) end
    redis.call('HINCRBY', KEYS[10], owner, size - before)
    -- The vector lives in the change entry and then the snapshot, not here: once is enough.
    redis.call('HSET', KEYS[i], 'id', id, 'text', text, 'metadata', metadata,
               'revision', ARGV[at + 5], 'int_id', int_id, 'updated_at', ARGV[3], 'owner', owner)
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

# KEYS: revisions, int ids, changes, version, count, the document's hash, tombstones, config,
# owners' document counts, owners' byte counts. ARGV: stored id, revision, forget-before, the
# deleting owner, the owner of documents that record none (`public`).
# Returns 1 (deleted), 0 (no such document) or -1 (another owner's).
_DELETE = (
    _FORGET
    + """
forget_tombstones(KEYS[1], KEYS[7], KEYS[8], ARGV[3])
if redis.call('EXISTS', KEYS[6]) == 0 then return 0 end
local holder = redis.call('HGET', KEYS[6], 'owner')
if (holder or ARGV[5]) ~= ARGV[4] then return -1 end
if holder then
  redis.call('HINCRBY', KEYS[9], holder, -1)
  local size = redis.call('HSTRLEN', KEYS[6], 'text') + redis.call('HSTRLEN', KEYS[6], 'metadata')
  redis.call('HINCRBY', KEYS[10], holder, -size)
end
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

# KEYS: owners' document counts, owners' byte counts, then documents' hashes (stored ids that
# stay: INDEX_SCOPE=shared). ARGV: the new owner, the owner of documents that record none.
# Each document of the latter becomes the new owner's; returns how many did.
_GIVE = """
local given = 0
for i = 3, #KEYS do
  local holder = redis.call('HGET', KEYS[i], 'owner')
  if redis.call('EXISTS', KEYS[i]) == 1 and (not holder or holder == ARGV[2]) then
    local size = redis.call('HSTRLEN', KEYS[i], 'text') + redis.call('HSTRLEN', KEYS[i], 'metadata')
    if holder then
      redis.call('HINCRBY', KEYS[1], holder, -1)
      redis.call('HINCRBY', KEYS[2], holder, -size)
    end
    redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
    redis.call('HINCRBY', KEYS[2], ARGV[1], size)
    redis.call('HSET', KEYS[i], 'owner', ARGV[1])
    given = given + 1
  end
end
return given
"""


class IndexMismatchError(Exception):
    """The index was built with another model; its vectors cannot be mixed with these."""


class NotOwnerError(Exception):
    """The document belongs to another owner: only the owner that wrote it may change it."""


@dataclass
class Usage:
    """What an owner stores, and its caps (0: none)."""

    documents: int
    bytes: int
    max_documents: int
    max_bytes: int

    def to_json(self) -> dict[str, int | None]:
        return {
            "documents": self.documents,
            "bytes": self.bytes,
            "max_documents": self.max_documents or None,
            "max_bytes": self.max_bytes or None,
        }


class QuotaExceededError(Exception):
    """A request would take its owner past a cap: `usage` now, and what it would add."""

    def __init__(self, usage: Usage, documents: int, size: int) -> None:
        super().__init__("over the owner's document caps")
        self.usage = usage
        self.documents = documents
        self.size = size


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


def metadata_json(metadata: dict[str, Any] | None) -> str:
    """Metadata as the store keeps it: compact JSON, fields sorted."""
    return json.dumps(metadata or {}, separators=(",", ":"), sort_keys=True)


def size_of(document: dict[str, Any]) -> int:
    """The bytes of text and metadata a document takes in the store (what KEY_MAX_DOCUMENT_MB counts)."""
    return len(document["text"].encode()) + len(metadata_json(document.get("metadata")).encode())


class DocumentStore:
    """The documents, by owner: ids in and out are the ids owners know (jobs.index.owners).

    Owners other than `public` may store at most `max_documents` documents and `max_bytes`
    bytes of text and metadata (0: no cap), enforced by the write itself.
    """

    def __init__(
        self,
        connection: redis.Redis,
        tombstone_seconds: float = TOMBSTONE_SECONDS,
        scope: str = owners.KEY,
        max_documents: int = 0,
        max_bytes: int = 0,
    ) -> None:
        if scope not in owners.SCOPES:
            raise ValueError(f"unknown index scope {scope!r}")
        self.connection = connection
        self.tombstone_seconds = tombstone_seconds
        self.scope = scope
        self.max_documents = max_documents
        self.max_bytes = max_bytes
        self._upsert = connection.register_script(_UPSERT)
        self._delete = connection.register_script(_DELETE)
        self._give = connection.register_script(_GIVE)

    @classmethod
    def for_settings(cls, connection: redis.Redis, settings: Settings) -> DocumentStore:
        """The store as `settings` configure it: INDEX_SCOPE and the per-key caps."""
        return cls(
            connection,
            scope=settings.index_scope,
            max_documents=settings.key_max_documents,
            max_bytes=settings.key_max_document_mb * 2**20,
        )

    def stored_id(self, owner: str, doc_id: str) -> str:
        return owners.stored_id(self.scope, owner, doc_id)

    def upsert(
        self,
        documents: list[dict[str, Any]],
        vectors: np.ndarray,
        revision: int | list[int],
        model: str,
        owner: str | list[str] = owners.PUBLIC,
    ) -> list[str]:
        """Write documents with their vectors, all or none; per document 'indexed', 'superseded',
        'refused' (another owner's) or 'quota_exceeded' (past its owner's caps: not written).

        `revision` and `owner` are every document's, or one per document (documents of
        several requests).
        """
        revisions = revision if isinstance(revision, list) else [revision] * len(documents)
        writers = owner if isinstance(owner, list) else [owner] * len(documents)
        args: list[Any] = [
            model,
            vectors.shape[1],
            time.time(),
            uuid.uuid4().hex,
            self._forget_before(),
            self.max_documents,
            self.max_bytes,
            owners.PUBLIC,
        ]
        stored = []
        for document, vector, rev, writer in zip(documents, vectors, revisions, writers, strict=True):
            stored.append(self.stored_id(writer, document["id"]))
            # float16 in the change entry: half the bytes, and the same top 10 (tests/test_index.py).
            args += [
                stored[-1],
                document["text"],
                metadata_json(document.get("metadata")),
                vector.astype("float16").tobytes(),
                rev,
                writer,
            ]
        fixed = [
            keys.INDEX_REVISIONS,
            keys.INDEX_INT_IDS,
            keys.INDEX_NEXT_INT_ID,
            keys.INDEX_CHANGES,
            keys.INDEX_VERSION,
            keys.INDEX_COUNT,
            keys.INDEX_CONFIG,
            keys.INDEX_TOMBSTONES,
            keys.INDEX_OWNER_DOCUMENTS,
            keys.INDEX_OWNER_BYTES,
        ]
        try:
            outcome = self._upsert(keys=fixed + [keys.document(i) for i in stored], args=args)
        except redis.exceptions.ResponseError as error:
            if "INDEX_MISMATCH" in str(error):
                raise IndexMismatchError(str(error).split("INDEX_MISMATCH ", 1)[-1]) from None
            raise
        return [o.decode() if isinstance(o, bytes) else o for o in outcome]

    def delete(self, doc_id: str, revision: int | None = None, owner: str = owners.PUBLIC) -> bool:
        """Remove one of `owner`'s documents; False when there is none, NotOwnerError when the
        id is another owner's (INDEX_SCOPE=shared)."""
        revision = new_revision() if revision is None else revision
        stored = self.stored_id(owner, doc_id)
        removed = self._delete(
            keys=[
                keys.INDEX_REVISIONS,
                keys.INDEX_INT_IDS,
                keys.INDEX_CHANGES,
                keys.INDEX_VERSION,
                keys.INDEX_COUNT,
                keys.document(stored),
                keys.INDEX_TOMBSTONES,
                keys.INDEX_CONFIG,
                keys.INDEX_OWNER_DOCUMENTS,
                keys.INDEX_OWNER_BYTES,
            ],
            args=[stored, revision, self._forget_before(), owner, owners.PUBLIC],
        )
        if removed == -1:
            raise NotOwnerError(doc_id)
        return bool(removed)

    def give_public(self, stored_ids: list[str], owner: str) -> int:
        """Make these of `public`'s documents `owner`'s where they are (their ids stay: a shared
        index); returns how many. jobs.index.adopt moves them in a namespaced one."""
        counts = [keys.INDEX_OWNER_DOCUMENTS, keys.INDEX_OWNER_BYTES]
        hashes = [keys.document(stored) for stored in stored_ids]
        return int(self._give(keys=counts + hashes, args=[owner, owners.PUBLIC]))

    def _forget_before(self) -> int:
        """The revision before which tombstones are forgotten now."""
        return new_revision() - int(self.tombstone_seconds * 1_000_000_000)

    def get(self, doc_id: str, owner: str = owners.PUBLIC) -> Document | None:
        """One of the documents `owner` can read (in a shared index, any)."""
        (document,) = self.get_stored([self.stored_id(owner, doc_id)])
        return document

    def get_stored(self, stored_ids: list[str]) -> list[Document | None]:
        """Documents by the ids they are stored under (as replicas return them)."""
        with self.connection.pipeline(transaction=False) as pipe:
            for stored in stored_ids:
                pipe.hmget(keys.document(stored), "text", "metadata", "updated_at")
            rows = pipe.execute()
        return [
            Document(owners.client_id(stored), text.decode(), json.loads(metadata), float(updated_at))
            if text is not None
            else None
            for stored, (text, metadata, updated_at) in zip(stored_ids, rows, strict=True)
        ]

    def usage(self, owner: str) -> Usage:
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hget(keys.INDEX_OWNER_DOCUMENTS, owner)
            pipe.hget(keys.INDEX_OWNER_BYTES, owner)
            documents, size = pipe.execute()
        capped = owner != owners.PUBLIC
        return Usage(
            int(documents or 0),
            int(size or 0),
            self.max_documents if capped else 0,
            self.max_bytes if capped else 0,
        )

    def check_room(self, owner: str, documents: list[dict[str, Any]]) -> None:
        """QuotaExceededError when writing `documents` would take `owner` past a cap.

        Counts the ids that would be new and the bytes the request adds (less those of the
        documents it replaces), in one round trip. Jobs accepted but not run yet are not
        counted: the write itself enforces the caps, whatever was accepted.
        """
        if owner == owners.PUBLIC or not (self.max_documents or self.max_bytes):
            return
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hget(keys.INDEX_OWNER_DOCUMENTS, owner)
            pipe.hget(keys.INDEX_OWNER_BYTES, owner)
            for document in documents:
                stored = keys.document(self.stored_id(owner, document["id"]))
                pipe.hget(stored, "owner")
                pipe.hstrlen(stored, "text")
                pipe.hstrlen(stored, "metadata")
            counted, size, *rows = pipe.execute()
        usage = Usage(int(counted or 0), int(size or 0), self.max_documents, self.max_bytes)
        new = added = 0
        for i, document in enumerate(documents):
            holder, text, metadata = rows[3 * i : 3 * i + 3]
            if text and holder != owner.encode():
                continue  # another owner's: the write would refuse it
            new += 0 if text else 1
            added += size_of(document) - text - metadata
        over_documents = usage.max_documents and new and usage.documents + new > usage.max_documents
        over_bytes = usage.max_bytes and added > 0 and usage.bytes + added > usage.max_bytes
        if over_documents or over_bytes:
            raise QuotaExceededError(usage, new, added)

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
