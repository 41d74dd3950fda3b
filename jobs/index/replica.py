"""A FAISS replica of the document index, for a process that serves searches.

A replica starts from the latest snapshot in Redis (or from nothing), then replays the
`INDEX_CHANGES` stream from the snapshot's position. `sync()` replays whatever has been
appended since; calling it before each search gives read-your-writes on every process.
Every `snapshot_every` changes one replica writes a new snapshot (jobs.index.snapshots) and
trims the stream behind it; a replica that finds itself behind the trimmed point reloads.

One copy of the index per host: a snapshot is two files in INDEX_DIR, written once per host
from Redis, that every process on the host maps read-only: the FAISS index of its vectors
(IO_FLAG_MMAP_IFC) and an SQLite file of its documents by position (ids, metadata, the
inverted index for filters). What changed since the snapshot lives in each process's own
small exact index (the tail), with its documents in dicts; snapshot positions replaced or
deleted since are hidden from searches by an ID selector. A replica moves to a newer
snapshot once its tail holds REBASE_AFTER changes. FAISS aborts the process on an add or
remove on a mapped index: the base is only ever searched.

Above INDEX_EXACT_UP_TO documents the snapshot's index is an HNSW graph: searches of it are
approximate (INDEX_EF_SEARCH candidates), the tail's stay exact. A filter that leaves at most
EXACT_FILTER_UP_TO snapshot documents is searched exactly, by their vectors.

A search may be limited to one owner's namespace (jobs.index.owners), which is indexed like a
metadata value: the snapshot's positions of a namespace are read once per snapshot, and a
namespace that holds the whole snapshot (one key, or the open API) filters nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import redis

from jobs import keys
from jobs.index import snapshots
from jobs.index.owners import namespace_of
from jobs.index.snapshot_docs import SnapshotDocs, filter_key, filter_keys
from jobs.settings import get_settings

log = logging.getLogger(__name__)

# Stream entries read per round trip while replaying.
REPLAY_BATCH = 2000
# Changes in a replica's tail (new vectors and hidden snapshot ones) after which it moves to
# a newer snapshot when there is one.
REBASE_AFTER = 10_000
# A filter leaving at most this many documents of an HNSW snapshot is searched exactly.
EXACT_FILTER_UP_TO = 20_000
# The most candidates a filtered HNSW search looks at.
MAX_EF_SEARCH = 4096


def _as_set(posting: int | set[int] | None) -> set[int]:
    if posting is None:
        return set()
    return posting if isinstance(posting, set) else {posting}


class Replica:
    def __init__(
        self, connection: redis.Redis, dimensions: int, threads: int = 1, directory: Path | None = None
    ) -> None:
        faiss.omp_set_num_threads(threads)
        settings = get_settings()
        self.connection = connection
        self.dimensions = dimensions
        self.directory = Path(directory or settings.index_dir)
        self.exact_up_to = settings.index_exact_up_to
        self.ef_search = settings.index_ef_search
        self.position = "0-0"  # last stream entry applied
        self.version = 0  # index version of that entry
        self._lock = threading.RLock()
        self._reset()

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        # The snapshot: its vectors and documents, mapped from files the host's processes share.
        self.base: Any = None
        self.base_path: Path | None = None
        self.base_docs: SnapshotDocs | None = None
        self.base_version = 0
        self.base_dead = 0  # positions the snapshot itself marks dead
        # Each namespace's snapshot positions, read when first searched.
        self.base_namespaces: dict[str, np.ndarray] = {}
        # Changes since the snapshot: new vectors here, replaced or deleted base positions hidden.
        self.tail = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimensions))
        self.tail_ids: set[int] = set()
        self.hidden: set[int] = set()
        self.hidden_mask = np.zeros(0, dtype=bool)  # the same, by position
        self._hidden_selector: Any = None
        # The tail's documents by int id. Metadata is kept as the compact JSON the store wrote,
        # with an inverted index of its field values for filters: a value one document has
        # maps to its id alone, not to a set.
        self.doc_ids: dict[int, str] = {}
        self.metadata: dict[int, bytes] = {}
        self.postings: dict[str, int | set[int]] = {}
        self.namespaces: dict[str, set[int]] = {}  # the tail's int ids by namespace
        self.position = "0-0"
        self.version = 0
        self.epoch: bytes | None = None

    def __len__(self) -> int:
        base = self.base.ntotal if self.base is not None else 0
        return base - len(self.hidden) + self.tail.ntotal

    @property
    def approximate(self) -> bool:
        """Whether searches of the snapshot's vectors are approximate (HNSW)."""
        return self.base is not None and snapshots.is_approximate(self.base)

    def _forget(self, int_id: int) -> None:
        for key in filter_keys(self.metadata.get(int_id)):
            posting = self.postings.get(key)
            if posting == int_id:
                del self.postings[key]
            elif isinstance(posting, set):
                posting.discard(int_id)
                if len(posting) == 1:
                    self.postings[key] = next(iter(posting))
        self.metadata.pop(int_id, None)
        doc_id = self.doc_ids.pop(int_id, None)
        if doc_id is not None:
            members = self.namespaces[namespace_of(doc_id)]
            members.discard(int_id)
            if not members:
                del self.namespaces[namespace_of(doc_id)]

    def _remember(self, int_id: int, doc_id: str, metadata: bytes) -> None:
        self.doc_ids[int_id] = doc_id
        self.namespaces.setdefault(namespace_of(doc_id), set()).add(int_id)
        if metadata in (b"", b"{}"):
            return
        self.metadata[int_id] = metadata
        for key in filter_keys(metadata):
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

    def _hide_in_base(self, int_id: int) -> None:
        if self.base_docs is None:
            return
        position = self.base_docs.position_of(int_id)
        if position is not None and position not in self.hidden:
            self.hidden.add(position)
            self.hidden_mask[position] = True
            self._hidden_selector = None

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
                self._forget(int_id)
            self._hide_in_base(int_id)  # the snapshot's version of it, if any, is out of date
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
            if self.base_docs is not None:
                self.base_docs.close()
            self._reset()
            self.epoch = self.connection.hget(keys.INDEX_CONFIG, "epoch")
            self._load_snapshot()
            loaded = len(self)
            self.sync()
            log.info(
                "index replica loaded: %d documents (%d from a %s snapshot) in %.2f s",
                len(self),
                loaded,
                "approximate" if self.approximate else "exact",
                time.monotonic() - started,
            )

    def _load_snapshot(self) -> None:
        for _ in range(5):  # a snapshot replaced while it was being read: read the new one
            fields = ("epoch", "version", "format", "index_chunks", "docs_chunks", "chunks", "position")
            epoch, version, form, index_chunks, docs_chunks, chunks, position = self.connection.hmget(
                keys.INDEX_SNAPSHOT, fields
            )
            if epoch is None or epoch != self.epoch:
                return
            try:
                index_path, docs_path = self._snapshot_files(
                    int(version), form, int(index_chunks or chunks or 0), int(docs_chunks or 0)
                )
            except snapshots.SnapshotReplaced:
                continue
            index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP_IFC)
            if index.d != self.dimensions:
                raise ValueError(f"snapshot has {index.d} dimensions, the model {self.dimensions}")
            self.base, self.base_path, self.base_version = index, index_path, int(version)
            self.base_docs = SnapshotDocs(docs_path)
            self.hidden = set(self.base_docs.dead())
            self.hidden_mask = np.zeros(index.ntotal, dtype=bool)
            self.hidden_mask[list(self.hidden)] = True
            self.base_dead = len(self.hidden)
            self.position = position.decode()
            self.version = int(version)
            self._forget_older_files()
            return
        raise RuntimeError("the index snapshot kept changing while it was being read")

    def _snapshot_files(
        self, version: int, form: bytes | None, index_chunks: int, docs_chunks: int
    ) -> tuple[Path, Path]:
        """The host's files of snapshot `version`, copied from Redis by the first process to
        need them; SnapshotReplaced when Redis holds another snapshot by now."""
        from filelock import FileLock

        self.directory.mkdir(parents=True, exist_ok=True)
        paths = {
            name: snapshots.file_path(self.directory, self.epoch, version, name) for name in snapshots.FILES
        }
        if not all(path.exists() for path in paths.values()):
            with FileLock(f"{paths['index']}.lock", timeout=600):
                if form != snapshots.FORMAT:
                    if not all(path.exists() for path in paths.values()):
                        snapshots.convert_legacy(
                            self.connection, version, index_chunks, self.directory, self.epoch
                        )
                else:
                    for name, count in (("docs", docs_chunks), ("index", index_chunks)):
                        if not paths[name].exists():
                            snapshots.download(self.connection, version, name, count, paths[name])
        return paths["index"], paths["docs"]

    def _forget_older_files(self) -> None:
        """Older snapshots' files of this index: a process that maps one keeps its pages."""
        prefix = f"{snapshots.slug(self.epoch)}-"
        for old in [*self.directory.glob(f"{prefix}*.faiss"), *self.directory.glob(f"{prefix}*.sqlite")]:
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
            if trimmed_to is not None and snapshots.stream_id(trimmed_to.decode()) > snapshots.stream_id(
                self.position
            ):
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
                and self.tail.ntotal + len(self.hidden) - self.base_dead >= REBASE_AFTER
            ):
                # A newer snapshot holds much of this tail: map it instead (shared, not private).
                self.load()
            return applied

    # ------------------------------------------------------------------ searching

    def search(
        self, vector: np.ndarray, k: int, where: dict[str, Any] | None = None, namespace: str | None = None
    ) -> list[tuple[str, float]]:
        """The k nearest documents by cosine similarity, optionally only those matching `where`
        and only those of `namespace`; as (stored id, score)."""
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        with self._lock:
            base_hits: list[tuple[float, int]] = []
            tail_hits: list[tuple[float, int]] = []
            if self.base is not None and self.base.ntotal:
                visible = self._visible_base(where, namespace)
                if visible is None:
                    base_hits = self._search_base(
                        query, min(k, self.base.ntotal - len(self.hidden)), self._base_selector()
                    )
                elif len(visible):
                    base_hits = self._search_base_among(query, k, visible)
            if self.tail.ntotal:
                among = self._visible_tail(where, namespace)
                if among is None:
                    tail_hits = _search(self.tail, query, min(k, self.tail.ntotal), None)
                elif among:
                    tail_hits = _search(self.tail, query, min(k, len(among)), _batch(among))
            names = self.base_docs.doc_ids([i for _, i in base_hits]) if base_hits else {}
            hits = [(score, names[i]) for score, i in base_hits] + [
                (score, self.doc_ids[i]) for score, i in tail_hits
            ]
            hits.sort(key=lambda hit: -hit[0])
            return [(doc_id, score) for score, doc_id in hits[:k]]

    def _visible_base(self, where: dict[str, Any] | None, namespace: str | None) -> np.ndarray | None:
        """The snapshot positions a search may return, in order; None: every live one."""
        positions = None
        live = self.base.ntotal - self.base_dead
        if namespace is not None and self.base_docs.namespace_size(namespace) < live:
            positions = self.base_namespaces.get(namespace)
            if positions is None:
                positions = self.base_namespaces[namespace] = self.base_docs.namespace_positions(namespace)
        if where:
            matching = self._matching_base(where)
            matching_positions = np.fromiter(matching, dtype=np.int64, count=len(matching))
            positions = (
                np.sort(matching_positions)
                if positions is None
                else np.intersect1d(positions, matching_positions, assume_unique=True)
            )
        if positions is None:
            return None
        return positions[~self.hidden_mask[positions]] if self.hidden else positions

    def _visible_tail(self, where: dict[str, Any] | None, namespace: str | None) -> set[int] | None:
        """The tail's int ids a search may return; None: all of them."""
        sets = []
        if namespace is not None:
            members = self.namespaces.get(namespace, set())
            if len(members) < self.tail.ntotal:
                sets.append(members)
        if where:
            sets += [_as_set(self.postings.get(filter_key(f, v))) for f, v in where.items()]
        return _intersect(sets) if sets else None

    def vector(self, int_id: int) -> np.ndarray | None:
        """The vector this replica holds for a document (a unit vector); None if it has none."""
        with self._lock:
            if int_id in self.tail_ids:
                return self.tail.reconstruct(int_id)
            position = self.base_docs.position_of(int_id) if self.base_docs is not None else None
            if position is None or position in self.hidden:
                return None
            vector = self.base.reconstruct(position)
            return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def _search_base(
        self, query: np.ndarray, k: int, selector: Any, ef: int | None = None
    ) -> list[tuple[float, int]]:
        if k <= 0:
            return []
        if self.approximate:
            params = faiss.SearchParametersHNSW(efSearch=max(ef or self.ef_search, k), sel=selector)
            return _search(self.base, query, k, None, params)
        return _search(self.base, query, k, selector)

    def _search_base_among(self, query: np.ndarray, k: int, visible: np.ndarray) -> list[tuple[float, int]]:
        """Search only the snapshot positions in `visible` (a filter's, a namespace's)."""
        # A bitmap of the positions: cheaper to build than a hash set of them, and O(1) to ask.
        allowed = np.zeros(self.base.ntotal, dtype=bool)
        allowed[visible] = True
        bitmap = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(bitmap)
        k = min(k, len(visible))
        if not self.approximate:
            return _search(self.base, query, k, selector)
        if len(visible) <= EXACT_FILTER_UP_TO:
            # A graph search that may visit only a few of them misses: these vectors are few, so
            # the graph's storage is scanned for them instead (exact; reads only their vectors).
            return _search(self.base.storage, query, k, selector)
        # Look at as many candidates as an unfiltered search would see of them.
        share = len(visible) / max(1, self.base.ntotal)
        ef = min(MAX_EF_SEARCH, int(self.ef_search / share))
        return self._search_base(query, k, selector, ef)

    def _base_selector(self) -> Any:
        """Excludes the base's hidden positions (built again only when they change)."""
        if not self.hidden:
            return None
        if self._hidden_selector is None:
            batch = _batch(self.hidden)
            # The Not selector refers to the batch: both are kept alive together.
            self._hidden_selector = (faiss.IDSelectorNot(batch), batch)
        return self._hidden_selector[0]

    def _matching_base(self, where: dict[str, Any]) -> set[int]:
        return _intersect([self.base_docs.matching(filter_key(f, v)) for f, v in where.items()])

    # ------------------------------------------------------------------ snapshots

    def changes_since_snapshot(self) -> int:
        snapshot_version = self.connection.hget(keys.INDEX_SNAPSHOT, "version")
        return self.version - int(snapshot_version or 0)

    def write_snapshot(self, trim: bool = True) -> bool:
        """Store this replica as the snapshot (if no other process is writing one) and trim the
        stream. Searches and syncs go on while it is built."""
        with self._lock:
            ids = faiss.vector_to_array(self.tail.id_map).astype(np.int64)
            capture = snapshots.Capture(
                dimensions=self.dimensions,
                base=self.base,
                base_index_path=self.base_path,
                base_docs_path=self.base_docs.path if self.base_docs is not None else None,
                hidden=sorted(self.hidden),
                tail_vectors=self.tail.index.reconstruct_n(0, self.tail.ntotal)
                if self.tail.ntotal
                else np.zeros((0, self.dimensions), dtype=np.float32),
                tail_rows=[(i, self.doc_ids[i], self.metadata.get(i)) for i in ids.tolist()],
                position=self.position,
                version=self.version,
                epoch=self.epoch,
            )
        if self.base is not None and capture.version == self.base_version:
            return False  # the snapshot is this replica already
        built = snapshots.write(self.connection, capture, self.directory, self.exact_up_to, trim)
        if built is None:
            return False
        log.info(
            "index snapshot written: %d documents at version %d (%s%s, %.1f s)",
            capture.live,
            capture.version,
            built["kind"],
            ", extended in place" if built["in_place"] else "",
            built["build_seconds"],
        )
        # Its own tail is in the snapshot now: map that instead (the files are on this host).
        self.load()
        return True


def _intersect(sets: list[set[int]]) -> set[int]:
    sets.sort(key=len)
    result = set(sets[0])
    for other in sets[1:]:
        result &= other
    return result


def _batch(ids: set[int]) -> Any:
    return faiss.IDSelectorBatch(np.fromiter(ids, dtype=np.int64, count=len(ids)))


def _search(
    index: Any, query: np.ndarray, k: int, selector: Any, params: Any = None
) -> list[tuple[float, int]]:
    if params is None and selector is not None:
        params = faiss.SearchParameters(sel=selector)
    if params is None:
        scores, ids = index.search(query, k)
    else:
        scores, ids = index.search(query, k, params=params)
    return [(float(score), int(i)) for score, i in zip(scores[0], ids[0], strict=True) if i != -1]
