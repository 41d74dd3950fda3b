"""Building a snapshot of the index, and moving its files between Redis and a host's disk.

A snapshot is a FAISS index of the vectors and an SQLite file of the documents
(jobs.index.snapshot_docs), numbered alike by position. Up to `INDEX_EXACT_UP_TO` live
documents the index is exact (IndexFlatIP); above, it is an HNSW graph over float16 vectors
(approximate: recall@10 and latency at a million documents in BENCHMARKS.md).

Building runs outside the replica's lock, so searches and writes go on meanwhile. An exact
index is rebuilt whole (a copy of its vectors). An HNSW graph cannot remove a vector and is
slow to build (minutes at a million documents), so it is extended in place: the changes
since the last snapshot are added, and the vectors of replaced or deleted documents stay as
dead positions that searches skip, until they are a DEAD_SHARE of the graph; then it is
rebuilt from the live vectors.

In Redis the files are chunks of one hash. A writer fills a staging hash and renames it over
the snapshot in the same transaction that trims the change stream, so readers see one whole
snapshot or the one before; a reader checks each chunk's version as it copies it to disk.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import redis

from jobs import keys
from jobs.files import write_atomically
from jobs.index.snapshot_docs import write_docs

# Snapshot bytes per Redis hash field (well under Redis's 512 MB value and 1 GB query limits).
SNAPSHOT_CHUNK = 64 * 1024 * 1024
FORMAT = b"2"
# HNSW parameters: 32 links per node, 64 candidates while building. Measured on clustered
# 384-d vectors: recall@10 0.95+ at efSearch 256 (HNSW16 never reached 0.95).
HNSW_LINKS = 32
HNSW_EF_CONSTRUCTION = 64
# An HNSW snapshot is rebuilt from its live vectors once this share of it is dead.
DEAD_SHARE = 0.1
# Vectors added per call while building: between calls the snapshot lock is renewed.
BUILD_BATCH = 20_000


@dataclass
class Capture:
    """What a replica holds, taken under its lock; built into a snapshot without it."""

    dimensions: int
    base: Any  # the mapped FAISS index of the current snapshot, or None
    base_index_path: Path | None
    base_docs_path: Path | None
    hidden: list[int]  # base positions not live any more (replaced, deleted, dead)
    tail_vectors: np.ndarray
    tail_rows: list[tuple[int, str, bytes | None]]  # (int_id, doc_id, metadata) in tail order
    position: str
    version: int
    epoch: bytes | None

    @property
    def live(self) -> int:
        base = self.base.ntotal if self.base is not None else 0
        return base - len(self.hidden) + len(self.tail_rows)


def is_approximate(index: Any) -> bool:
    return isinstance(index, faiss.IndexHNSW)


def build(capture: Capture, work: Path, exact_up_to: int, keep_alive: Callable[[], None]) -> dict[str, Any]:
    """Write the snapshot's index and documents files into `work`; returns what it built."""
    base, hidden = capture.base, capture.hidden
    approximate = capture.live > exact_up_to
    in_place = (
        approximate
        and base is not None
        and is_approximate(base)
        and len(hidden) <= DEAD_SHARE * base.ntotal
        and capture.base_index_path is not None
    )
    if in_place:
        # A private copy to extend: the mapped base is shared and read-only.
        index = faiss.read_index(str(capture.base_index_path))
        first = index.ntotal
        dead, renumber = hidden, False
        _add(index, capture.tail_vectors, keep_alive)
    else:
        if approximate:
            # float16 storage: the vectors arrive as float16 (jobs.index.store), so nothing is
            # lost, and the file (in Redis and in every host's page cache) is half the size.
            index = faiss.IndexHNSWSQ(
                capture.dimensions, faiss.ScalarQuantizer.QT_fp16, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT
            )
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.is_trained = True  # float16 has nothing to learn
        else:
            index = faiss.IndexFlatIP(capture.dimensions)
        if base is not None and base.ntotal:
            _add(index, _live_vectors(base, hidden), keep_alive)
        first = index.ntotal
        _add(index, capture.tail_vectors, keep_alive)
        dead, renumber = [], True
    faiss.write_index(index, str(work / "index.faiss"))
    rows = (
        (first + i, int_id, doc_id, metadata)
        for i, (int_id, doc_id, metadata) in enumerate(capture.tail_rows)
    )
    write_docs(
        work / "docs.sqlite",
        rows,
        dead=dead,
        copy_from=capture.base_docs_path,
        drop=hidden,
        renumber=renumber,
    )
    return {"kind": "hnsw" if approximate else "flat", "in_place": in_place, "vectors": index.ntotal}


def _add(index: Any, vectors: Iterable[np.ndarray] | np.ndarray, keep_alive: Callable[[], None]) -> None:
    batches = (
        (vectors[start : start + BUILD_BATCH] for start in range(0, len(vectors), BUILD_BATCH))
        if isinstance(vectors, np.ndarray)
        else vectors
    )
    for batch in batches:
        if len(batch):
            index.add(np.ascontiguousarray(batch, dtype=np.float32))
        keep_alive()


def _live_vectors(base: Any, hidden: list[int]) -> Iterator[np.ndarray]:
    """The base's vectors but the hidden ones, in order, a batch at a time (a copy of all of
    them would double the memory a rebuild takes)."""
    hidden_positions = np.asarray(hidden, dtype=np.int64)
    for start in range(0, base.ntotal, BUILD_BATCH):
        count = min(BUILD_BATCH, base.ntotal - start)
        vectors = base.reconstruct_n(start, count)
        if is_approximate(base):  # stored as float16: unit length again
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        gone = hidden_positions[(hidden_positions >= start) & (hidden_positions < start + count)]
        yield np.delete(vectors, gone - start, axis=0) if len(gone) else vectors


def write(
    connection: redis.Redis,
    capture: Capture,
    directory: Path,
    exact_up_to: int,
    trim: bool,
    lock_seconds: int = 300,
) -> dict[str, Any] | None:
    """Build a snapshot from `capture`, store it in Redis and trim the stream behind it; keep
    its files in `directory` as this host's copy. None when another process is writing one."""
    lock = connection.lock(keys.INDEX_SNAPSHOT_LOCK, timeout=lock_seconds)
    if not lock.acquire(blocking=False):
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=directory, prefix=".build-"))
        try:
            started = time.monotonic()
            built = build(capture, work, exact_up_to, lock.reacquire)
            built["build_seconds"] = round(time.monotonic() - started, 2)
            fields: dict[str, Any] = {
                "format": FORMAT,
                "kind": built["kind"],
                "documents": capture.live,
                "position": capture.position,
                "version": capture.version,
                "created_at": time.time(),
                "trimmed_to": capture.position if trim else "0-0",
                "epoch": capture.epoch or b"",
            }
            connection.delete(keys.INDEX_SNAPSHOT_STAGING)
            for name in ("index", "docs"):
                fields[f"{name}_chunks"] = _upload(connection, work / FILES[name], name, lock.reacquire)
            connection.hset(keys.INDEX_SNAPSHOT_STAGING, mapping=fields)
            lock.reacquire()  # raises if the lock was lost: another writer may have taken over
            with connection.pipeline() as pipe:
                pipe.rename(keys.INDEX_SNAPSHOT_STAGING, keys.INDEX_SNAPSHOT)
                if trim:
                    # Entries up to the snapshot's position are in the snapshot.
                    pipe.xtrim(keys.INDEX_CHANGES, minid=_next_id(capture.position), approximate=False)
                pipe.execute()
            for name in ("index", "docs"):
                target = file_path(directory, capture.epoch, capture.version, name)
                if not target.exists():
                    (work / FILES[name]).replace(target)
            return built
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()


FILES = {"index": "index.faiss", "docs": "docs.sqlite"}


def file_path(directory: Path, epoch: bytes | None, version: int, name: str) -> Path:
    suffix = ".faiss" if name == "index" else ".sqlite"
    return directory / f"{slug(epoch)}-{version}{suffix}"


def _upload(connection: redis.Redis, path: Path, name: str, keep_alive: Callable[[], None]) -> int:
    count = 0
    with open(path, "rb") as source:
        while chunk := source.read(SNAPSHOT_CHUNK):
            connection.hset(keys.INDEX_SNAPSHOT_STAGING, f"{name}:{count}", chunk)
            count += 1
            keep_alive()
    return count


class SnapshotReplaced(Exception):
    """Redis holds another snapshot than the one being read."""


def download(connection: redis.Redis, version: int, name: str, chunks: int, target: Path) -> None:
    """Copy a snapshot file from Redis to `target`, a chunk per round trip, each checked to
    belong to `version`."""

    def copy(temporary: Path) -> None:
        with open(temporary, "wb") as out:
            for i in range(chunks):
                with connection.pipeline() as pipe:
                    pipe.hget(keys.INDEX_SNAPSHOT, "version")
                    pipe.hget(keys.INDEX_SNAPSHOT, f"{name}:{i}")
                    current, part = pipe.execute()
                if current is None or int(current) != version or part is None:
                    raise SnapshotReplaced
                out.write(part)

    write_atomically(target, copy)


def convert_legacy(
    connection: redis.Redis, version: int, chunks: int, directory: Path, epoch: bytes | None
) -> None:
    """Snapshots of earlier releases: one IndexIDMap2 blob and a JSON map of documents by int
    id. Written to this host's files in the current format (exact index)."""
    with connection.pipeline() as pipe:
        pipe.hget(keys.INDEX_SNAPSHOT, "version")
        pipe.hmget(keys.INDEX_SNAPSHOT, [f"index:{i}" for i in range(chunks)])
        pipe.hget(keys.INDEX_SNAPSHOT, "documents")
        current, parts, documents = pipe.execute()
    if current is None or int(current) != version or any(part is None for part in parts):
        raise SnapshotReplaced
    old = faiss.deserialize_index(np.frombuffer(b"".join(parts), dtype=np.uint8))
    ids = faiss.vector_to_array(old.id_map).astype(np.int64)
    index = faiss.IndexFlatIP(old.d)
    if len(ids):
        index.add(old.index.reconstruct_n(0, old.ntotal))
    by_id = json.loads(documents or b"{}")

    def rows() -> Any:
        for position, int_id in enumerate(ids.tolist()):
            doc_id, metadata = by_id[str(int_id)]
            yield (
                position,
                int_id,
                doc_id,
                json.dumps(metadata, separators=(",", ":"), sort_keys=True).encode(),
            )

    write_atomically(file_path(directory, epoch, version, "docs"), lambda path: write_docs(path, rows()))
    write_atomically(
        file_path(directory, epoch, version, "index"), lambda path: faiss.write_index(index, str(path))
    )


def slug(epoch: bytes | None) -> str:
    """A file-name-safe name for an index (its epoch)."""
    text = (epoch or b"none").decode(errors="replace")
    return "index-" + "".join(ch if ch.isalnum() else "_" for ch in text)[:64]


def stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _next_id(value: str) -> str:
    ms, seq = stream_id(value)
    return f"{ms}-{seq + 1}"
