"""An in-memory FAISS replica of the document index, for a process that serves searches.

A replica starts from the latest snapshot in Redis (or from nothing), then replays the
`INDEX_CHANGES` stream from the snapshot's position. `sync()` replays whatever has been
appended since; calling it before each search gives read-your-writes on every process.
Every `snapshot_every` changes one replica writes a new snapshot and trims the stream
behind it; a replica that finds itself behind the trimmed point reloads the snapshot.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import faiss
import numpy as np
import redis

from jobs import keys

log = logging.getLogger(__name__)

# Stream entries read per round trip while replaying.
REPLAY_BATCH = 2000
# Snapshot bytes per Redis hash field (well under Redis's 512 MB value limit).
SNAPSHOT_CHUNK = 64 * 1024 * 1024


def filter_key(field: str, value: Any) -> str:
    """Canonical form of a metadata equality condition (1 and 1.0 are the same value)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return field + "\0" + json.dumps(value, sort_keys=True, separators=(",", ":"))


def _compact(metadata: dict[str, Any]) -> bytes:
    """Metadata as the store writes it (jobs.index.store): compact JSON, keys sorted."""
    return json.dumps(metadata, separators=(",", ":"), sort_keys=True).encode()


def _as_set(posting: int | set[int] | None) -> set[int]:
    if posting is None:
        return set()
    return posting if isinstance(posting, set) else {posting}


class Replica:
    def __init__(self, connection: redis.Redis, dimensions: int, threads: int = 1) -> None:
        faiss.omp_set_num_threads(threads)
        self.connection = connection
        self.dimensions = dimensions
        self.position = "0-0"  # last stream entry applied
        self.version = 0  # index version of that entry
        self._lock = threading.RLock()
        self._reset()

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimensions))
        self.doc_ids: dict[int, str] = {}
        # Metadata as the compact JSON the store wrote, and an inverted index of its field
        # values for filters: a value one document has maps to its id alone, not to a set.
        # (A dict and a set per field of every document made 2 KB of metadata cost ~35 KB.)
        self.metadata: dict[int, bytes] = {}
        self.postings: dict[str, int | set[int]] = {}
        self.position = "0-0"
        self.version = 0
        self.epoch: bytes | None = None

    def __len__(self) -> int:
        return self.index.ntotal

    def metadata_of(self, int_id: int) -> dict[str, Any]:
        raw = self.metadata.get(int_id)
        return json.loads(raw) if raw else {}

    def _forget(self, int_id: int) -> None:
        for field, value in self.metadata_of(int_id).items():
            key = filter_key(field, value)
            posting = self.postings.get(key)
            if posting == int_id:
                del self.postings[key]
            elif isinstance(posting, set):
                posting.discard(int_id)
                if len(posting) == 1:
                    self.postings[key] = next(iter(posting))
        self.metadata.pop(int_id, None)
        self.doc_ids.pop(int_id, None)

    def _remember(self, int_id: int, doc_id: str, metadata: bytes) -> None:
        self.doc_ids[int_id] = doc_id
        if metadata in (b"", b"{}"):
            return
        self.metadata[int_id] = metadata
        for field, value in json.loads(metadata).items():
            key = filter_key(field, value)
            posting = self.postings.get(key)
            if posting is None:
                self.postings[key] = int_id
            elif isinstance(posting, set):
                posting.add(int_id)
            elif posting != int_id:
                self.postings[key] = {posting, int_id}

    def _vector(self, raw: bytes) -> np.ndarray:
        """A change entry's vector: float16 (as the store writes it) or float32 (entries written
        before), as a float32 unit vector."""
        if len(raw) == 2 * self.dimensions:
            vector = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
            return vector / max(float(np.linalg.norm(vector)), 1e-12)
        return np.frombuffer(raw, dtype=np.float32)

    def _apply(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Apply stream entries in order; consecutive upserts go to FAISS as one batch."""
        pending_ids: list[int] = []
        pending_vectors: list[bytes] = []

        def flush() -> None:
            if pending_ids:
                ids = np.array(pending_ids, dtype=np.int64)
                vectors = np.stack([self._vector(raw) for raw in pending_vectors])
                self.index.add_with_ids(vectors, ids)
                pending_ids.clear()
                pending_vectors.clear()

        for _entry_id, fields in entries:
            int_id = int(fields[b"int_id"])
            if int_id in self.doc_ids:
                flush()  # this id may be waiting in the batch: keep the order of changes
                self.index.remove_ids(np.array([int_id], dtype=np.int64))
                self._forget(int_id)
            if fields[b"op"] == b"upsert":
                pending_ids.append(int_id)
                pending_vectors.append(fields[b"vector"])
                self._remember(int_id, fields[b"id"].decode(), fields[b"metadata"])
        flush()
        if entries:
            self.position = entries[-1][0].decode()
            self.version = int(entries[-1][1][b"version"])

    # ------------------------------------------------------------------ loading and syncing

    def load(self) -> None:
        """Start over from the latest snapshot (if any), then replay the stream."""
        with self._lock:
            started = time.monotonic()
            self._reset()
            self.epoch = self.connection.hget(keys.INDEX_CONFIG, "epoch")
            snapshot = self.connection.hgetall(keys.INDEX_SNAPSHOT)
            if snapshot and snapshot.get(b"epoch") == self.epoch:
                self._load_snapshot(snapshot)
            loaded = len(self)
            self.sync()
            log.info(
                "index replica loaded: %d documents (%d from a snapshot) in %.2f s",
                len(self),
                loaded,
                time.monotonic() - started,
            )

    def _load_snapshot(self, snapshot: dict[bytes, bytes]) -> None:
        chunks = int(snapshot[b"chunks"])
        blob = b"".join(snapshot[f"index:{i}".encode()] for i in range(chunks))
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        if index.d != self.dimensions:
            raise ValueError(f"snapshot has {index.d} dimensions, the model {self.dimensions}")
        self.index = index
        for int_id, (doc_id, metadata) in json.loads(snapshot[b"documents"]).items():
            self._remember(int(int_id), doc_id, _compact(metadata))
        self.position = snapshot[b"position"].decode()
        self.version = int(snapshot[b"version"])

    def sync(self) -> int:
        """Apply every change appended since the last sync; returns how many."""
        with self._lock:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.hget(keys.INDEX_SNAPSHOT, "trimmed_to")
                pipe.hget(keys.INDEX_CONFIG, "epoch")
                trimmed_to, epoch = pipe.execute()
            if epoch != self.epoch:
                # Not the index this replica was built from: Redis was emptied, or the index made anew.
                log.info("the index in Redis is a new one; reloading")
                self.load()
                return 0
            if trimmed_to is not None and _stream_id(trimmed_to.decode()) > _stream_id(self.position):
                # Changes this replica has not seen were trimmed away: only the snapshot has them.
                log.warning("index replica fell behind the trimmed stream; reloading")
                self.load()
                return 0
            applied = 0
            while True:
                entries = self.connection.xrange(
                    keys.INDEX_CHANGES, min=f"({self.position}", max="+", count=REPLAY_BATCH
                )
                self._apply(entries)
                applied += len(entries)
                if len(entries) < REPLAY_BATCH:
                    return applied

    # ------------------------------------------------------------------ searching

    def search(
        self, vector: np.ndarray, k: int, where: dict[str, Any] | None = None
    ) -> list[tuple[str, float]]:
        """The k nearest documents by cosine similarity, optionally only those matching `where`."""
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        with self._lock:
            if where:
                allowed = self._matching(where)
                if not allowed:
                    return []
                selector = faiss.IDSelectorBatch(np.fromiter(allowed, dtype=np.int64, count=len(allowed)))
                params = faiss.SearchParameters(sel=selector)
                scores, ids = self.index.search(query, min(k, len(allowed)), params=params)
            else:
                if self.index.ntotal == 0:
                    return []
                scores, ids = self.index.search(query, min(k, self.index.ntotal))
            return [
                (self.doc_ids[int(i)], float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i != -1
            ]

    def _matching(self, where: dict[str, Any]) -> set[int]:
        sets = [_as_set(self.postings.get(filter_key(field, value))) for field, value in where.items()]
        sets.sort(key=len)
        result = set(sets[0])
        for other in sets[1:]:
            result &= other
        return result

    # ------------------------------------------------------------------ snapshots

    def changes_since_snapshot(self) -> int:
        snapshot_version = self.connection.hget(keys.INDEX_SNAPSHOT, "version")
        return self.version - int(snapshot_version or 0)

    def write_snapshot(self, trim: bool = True) -> bool:
        """Store this replica as the snapshot (if no other process is writing one) and trim the stream."""
        token = str(time.time_ns())
        if not self.connection.set(keys.INDEX_SNAPSHOT_LOCK, token, nx=True, ex=300):
            return False
        try:
            with self._lock:
                blob = faiss.serialize_index(self.index).tobytes()
                documents = {
                    str(int_id): [doc_id, self.metadata_of(int_id)] for int_id, doc_id in self.doc_ids.items()
                }
                position, version, epoch = self.position, self.version, self.epoch
            chunks = [blob[i : i + SNAPSHOT_CHUNK] for i in range(0, len(blob), SNAPSHOT_CHUNK)] or [b""]
            mapping: dict[str, Any] = {f"index:{i}": chunk for i, chunk in enumerate(chunks)}
            mapping.update(
                chunks=len(chunks),
                documents=json.dumps(documents, separators=(",", ":")),
                position=position,
                version=version,
                created_at=time.time(),
                trimmed_to=position if trim else "0-0",
                epoch=epoch or b"",
            )
            with self.connection.pipeline() as pipe:
                pipe.delete(keys.INDEX_SNAPSHOT)
                pipe.hset(keys.INDEX_SNAPSHOT, mapping=mapping)
                if trim:
                    # Entries up to the snapshot's position are in the snapshot.
                    pipe.xtrim(keys.INDEX_CHANGES, minid=_next_id(position), approximate=False)
                pipe.execute()
            log.info("index snapshot written: %d documents at version %d", len(documents), version)
            return True
        finally:
            if self.connection.get(keys.INDEX_SNAPSHOT_LOCK) == token.encode():
                self.connection.delete(keys.INDEX_SNAPSHOT_LOCK)


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _next_id(value: str) -> str:
    ms, seq = _stream_id(value)
    return f"{ms}-{seq + 1}"
