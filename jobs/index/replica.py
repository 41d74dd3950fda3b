"""A FAISS replica of the document index, for a process that serves searches.

A replica starts from the latest snapshot in Redis (or from nothing), then replays the
`INDEX_CHANGES` stream from the snapshot's position. `sync()` replays whatever has been
appended since; calling it before each search gives read-your-writes on every process.
Every `snapshot_every` changes one replica writes a new snapshot and trims the stream
behind it; a replica that finds itself behind the trimmed point reloads the snapshot.

One copy of the vectors per host: the snapshot's vectors (the base) are written once to a
file in INDEX_DIR, named after the index and the snapshot's version, and every process on
the host memory-maps it read-only (FAISS IO_FLAG_MMAP_IFC), so its pages are shared. What
changed since the snapshot lives in each process's own small index (the tail); base
vectors deleted or replaced since are hidden from searches by an ID selector. A replica
moves to a newer snapshot once its tail holds REBASE_AFTER changes. FAISS aborts the
process on an add or remove on a mapped index: the base is only ever searched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import redis

from jobs import keys
from jobs.files import write_atomically
from jobs.settings import get_settings

log = logging.getLogger(__name__)

# Stream entries read per round trip while replaying.
REPLAY_BATCH = 2000
# Snapshot bytes per Redis hash field (well under Redis's 512 MB value limit).
SNAPSHOT_CHUNK = 64 * 1024 * 1024
# Changes in a replica's tail (new vectors and hidden base ones) after which it moves to a
# newer snapshot when there is one.
REBASE_AFTER = 10_000


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
    def __init__(
        self, connection: redis.Redis, dimensions: int, threads: int = 1, directory: Path | None = None
    ) -> None:
        faiss.omp_set_num_threads(threads)
        self.connection = connection
        self.dimensions = dimensions
        self.directory = Path(directory or get_settings().index_dir)
        self.position = "0-0"  # last stream entry applied
        self.version = 0  # index version of that entry
        self._lock = threading.RLock()
        self._reset()

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        # The snapshot's vectors, mapped from a file the host's processes share; and its version.
        self.base: Any = None
        self.base_version = 0
        # Changes since the snapshot: new vectors here, replaced or deleted base ones hidden.
        self.tail = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimensions))
        self.tail_ids: set[int] = set()
        self.hidden: set[int] = set()
        self._hidden_selector: Any = None
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
        base = self.base.ntotal if self.base is not None else 0
        return base - len(self.hidden) + self.tail.ntotal

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
        """Apply stream entries in order; consecutive upserts go to the tail as one batch."""
        pending_ids: list[int] = []
        pending_vectors: list[bytes] = []

        def flush() -> None:
            if pending_ids:
                ids = np.array(pending_ids, dtype=np.int64)
                vectors = np.stack([self._vector(raw) for raw in pending_vectors])
                self.tail.add_with_ids(vectors, ids)
                self.tail_ids.update(pending_ids)
                pending_ids.clear()
                pending_vectors.clear()

        for _entry_id, fields in entries:
            int_id = int(fields[b"int_id"])
            if int_id in self.doc_ids:
                flush()  # this id may be waiting in the batch: keep the order of changes
                if int_id in self.tail_ids:
                    self.tail.remove_ids(np.array([int_id], dtype=np.int64))
                    self.tail_ids.discard(int_id)
                else:  # in the base, which is never written to
                    self.hidden.add(int_id)
                    self._hidden_selector = None
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
            self._load_snapshot()
            loaded = len(self)
            self.sync()
            log.info(
                "index replica loaded: %d documents (%d from a snapshot) in %.2f s",
                len(self),
                loaded,
                time.monotonic() - started,
            )

    def _load_snapshot(self) -> None:
        for _ in range(5):  # a snapshot replaced while it was being read: read the new one
            fields = ("epoch", "version", "chunks", "position", "documents")
            epoch, version, chunks, position, documents = self.connection.hmget(keys.INDEX_SNAPSHOT, fields)
            if epoch is None or epoch != self.epoch:
                return
            path = self._base_file(int(version), int(chunks))
            if path is None:
                continue
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
            if index.d != self.dimensions:
                raise ValueError(f"snapshot has {index.d} dimensions, the model {self.dimensions}")
            self.base, self.base_version = index, int(version)
            for int_id, (doc_id, metadata) in json.loads(documents).items():
                self._remember(int(int_id), doc_id, _compact(metadata))
            self.position = position.decode()
            self.version = int(version)
            self._forget_older_files()
            return
        raise RuntimeError("the index snapshot kept changing while it was being read")

    def _base_file(self, version: int, chunks: int) -> Path | None:
        """The host's file of snapshot `version`, written from Redis by the first process to
        need it; None when Redis holds another snapshot by now."""
        from filelock import FileLock

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{_slug(self.epoch)}-{version}.faiss"
        if path.exists():
            return path
        with FileLock(f"{path}.lock", timeout=600):
            if path.exists():
                return path
            with self.connection.pipeline() as pipe:  # the chunks and the version they belong to
                pipe.hget(keys.INDEX_SNAPSHOT, "version")
                pipe.hmget(keys.INDEX_SNAPSHOT, [f"index:{i}" for i in range(chunks)])
                current, parts = pipe.execute()
            if current is None or int(current) != version or any(part is None for part in parts):
                return None

            def write(temporary: Path) -> None:
                with open(temporary, "wb") as out:
                    for part in parts:
                        out.write(part)

            write_atomically(path, write)
        return path

    def _forget_older_files(self) -> None:
        """Older snapshots' files of this index: a process that maps one keeps its pages."""
        prefix = f"{_slug(self.epoch)}-"
        for old in self.directory.glob(f"{prefix}*.faiss"):
            suffix = old.stem[len(prefix) :]
            if suffix.isdigit() and int(suffix) < self.base_version:
                with contextlib.suppress(OSError):
                    old.unlink()
                    Path(f"{old}.lock").unlink(missing_ok=True)

    def sync(self) -> int:
        """Apply every change appended since the last sync; returns how many."""
        with self._lock:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.hmget(keys.INDEX_SNAPSHOT, "trimmed_to", "version")
                pipe.hget(keys.INDEX_CONFIG, "epoch")
                (trimmed_to, snapshot_version), epoch = pipe.execute()
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
                    break
            if (
                snapshot_version is not None
                and int(snapshot_version) > self.base_version
                and self.tail.ntotal + len(self.hidden) >= REBASE_AFTER
            ):
                # A newer snapshot holds much of this tail: map it instead (shared, not private).
                self.load()
            return applied

    # ------------------------------------------------------------------ searching

    def search(
        self, vector: np.ndarray, k: int, where: dict[str, Any] | None = None
    ) -> list[tuple[str, float]]:
        """The k nearest documents by cosine similarity, optionally only those matching `where`."""
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        with self._lock:
            allowed: set[int] | None = None
            if where:
                allowed = self._matching(where)
                if not allowed:
                    return []
            hits: list[tuple[float, int]] = []
            if self.base is not None and self.base.ntotal:
                if allowed is not None:
                    visible = allowed - self.hidden
                    selector = _batch(visible) if visible else None
                    wanted = min(k, len(visible))
                else:
                    selector, wanted = self._base_selector(), min(k, self.base.ntotal)
                if wanted:
                    hits += _search(self.base, query, wanted, selector)
            if self.tail.ntotal:
                if allowed is not None:
                    visible = allowed & self.tail_ids
                    selector = _batch(visible) if visible else None
                    wanted = min(k, len(visible))
                else:
                    selector, wanted = None, min(k, self.tail.ntotal)
                if wanted:
                    hits += _search(self.tail, query, wanted, selector)
            hits.sort(key=lambda hit: -hit[0])
            return [(self.doc_ids[int_id], score) for score, int_id in hits[:k]]

    def _base_selector(self) -> Any:
        """Excludes the base's hidden ids (built again only when they change)."""
        if not self.hidden:
            return None
        if self._hidden_selector is None:
            batch = _batch(self.hidden)
            # The Not selector refers to the batch: both are kept alive together.
            self._hidden_selector = (faiss.IDSelectorNot(batch), batch)
        return self._hidden_selector[0]

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
                blob = faiss.serialize_index(self._merged()).tobytes()
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

    def _merged(self) -> Any:
        """One index of every live vector: the base's visible ones and the tail's."""
        merged = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimensions))
        for part, hidden in ((self.base, self.hidden), (self.tail, set())):
            if part is None or not part.ntotal:
                continue
            ids = faiss.vector_to_array(part.id_map).astype(np.int64)
            vectors = part.index.reconstruct_n(0, part.ntotal)
            if hidden:
                keep = ~np.isin(ids, np.fromiter(hidden, dtype=np.int64, count=len(hidden)))
                ids, vectors = ids[keep], vectors[keep]
            if len(ids):
                merged.add_with_ids(np.ascontiguousarray(vectors), ids)
        return merged


def _batch(ids: set[int]) -> Any:
    return faiss.IDSelectorBatch(np.fromiter(ids, dtype=np.int64, count=len(ids)))


def _search(index: Any, query: np.ndarray, k: int, selector: Any) -> list[tuple[float, int]]:
    if selector is None:
        scores, ids = index.search(query, k)
    else:
        scores, ids = index.search(query, k, params=faiss.SearchParameters(sel=selector))
    return [(float(score), int(i)) for score, i in zip(scores[0], ids[0], strict=True) if i != -1]


def _slug(epoch: bytes | None) -> str:
    """A file-name-safe name for an index (its epoch)."""
    text = (epoch or b"none").decode(errors="replace")
    return "index-" + "".join(ch if ch.isalnum() else "_" for ch in text)[:64]


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _next_id(value: str) -> str:
    ms, seq = _stream_id(value)
    return f"{ms}-{seq + 1}"
