"""The snapshot's documents: an SQLite file every process on a host opens read-only.

A snapshot is two files: the FAISS index of its vectors and this file. Documents are
numbered by their vector's position in the FAISS index, so a search result needs no id map
in memory; ids, metadata and the inverted index of metadata values (for filters) stay on
disk and in the page cache the host's processes share, not in each process's heap.

`dead` lists positions whose vector is still in the FAISS index but whose document is gone:
an HNSW graph cannot remove a vector, so a snapshot extended in place (see
jobs.index.snapshots) leaves the old ones there, and searches skip them.

`namespaces` lists each owner's positions (jobs.index.owners: the namespace is part of the
stored id), and `owners` how many each has, so that a search of one owner's namespace reads
its positions once, and a namespace that is the whole snapshot is not filtered at all.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from jobs.index.owners import namespace_of

SCHEMA = """
CREATE TABLE docs (position INTEGER PRIMARY KEY, int_id INTEGER NOT NULL UNIQUE,
                   doc_id TEXT NOT NULL, metadata BLOB);
CREATE TABLE postings (key TEXT NOT NULL, position INTEGER NOT NULL,
                       PRIMARY KEY (key, position)) WITHOUT ROWID;
CREATE TABLE dead (position INTEGER PRIMARY KEY);
CREATE TABLE namespaces (owner TEXT NOT NULL, position INTEGER NOT NULL,
                         PRIMARY KEY (owner, position)) WITHOUT ROWID;
CREATE TABLE owners (owner TEXT PRIMARY KEY, documents INTEGER NOT NULL);
"""

# Maps the whole file: its pages come from the page cache the host's processes share.
MMAP_BYTES = 1 << 40


def filter_key(field: str, value: Any) -> str:
    """Canonical form of a metadata equality condition (1 and 1.0 are the same value)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return field + "\0" + json.dumps(value, sort_keys=True, separators=(",", ":"))


def filter_keys(metadata: bytes | None) -> list[str]:
    """The conditions a document's metadata (compact JSON) matches."""
    if not metadata or metadata == b"{}":
        return []
    return [filter_key(field, value) for field, value in json.loads(metadata).items()]


class SnapshotDocs:
    """One snapshot's documents, read-only. Not thread-safe: the replica's lock guards it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # immutable=1: the file never changes (a new snapshot is a new file), so no locks.
        self._db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self._db.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
        listed = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'namespaces'"
        self._listed = self._db.execute(listed).fetchone() is not None
        self._scanned: dict[str, np.ndarray] | None = None

    def _unlisted_namespaces(self) -> dict[str, np.ndarray] | None:
        """A file written before namespaces: each one's positions, read from the ids once (until
        the next snapshot replaces the file). None for a file that lists them."""
        if self._listed:
            return None
        if self._scanned is None:
            positions: dict[str, list[int]] = {}
            for position, doc_id in self._db.execute("SELECT position, doc_id FROM docs ORDER BY position"):
                positions.setdefault(namespace_of(doc_id), []).append(position)
            self._scanned = {owner: np.array(found, dtype=np.int64) for owner, found in positions.items()}
        return self._scanned

    def namespace_size(self, owner: str) -> int:
        """How many of the snapshot's documents are in `owner`'s namespace."""
        if (scanned := self._unlisted_namespaces()) is not None:
            return len(scanned.get(owner, ()))
        row = self._db.execute("SELECT documents FROM owners WHERE owner = ?", (owner,)).fetchone()
        return row[0] if row else 0

    def namespace_positions(self, owner: str) -> np.ndarray:
        """The positions of `owner`'s documents, in order."""
        if (scanned := self._unlisted_namespaces()) is not None:
            return scanned.get(owner, np.zeros(0, dtype=np.int64))
        rows = self._db.execute("SELECT position FROM namespaces WHERE owner = ? ORDER BY position", (owner,))
        return np.fromiter((position for (position,) in rows), dtype=np.int64)

    def close(self) -> None:
        self._db.close()

    def position_of(self, int_id: int) -> int | None:
        row = self._db.execute("SELECT position FROM docs WHERE int_id = ?", (int_id,)).fetchone()
        return row[0] if row else None

    def doc_ids(self, positions: list[int]) -> dict[int, str]:
        marks = ",".join("?" * len(positions))
        query = f"SELECT position, doc_id FROM docs WHERE position IN ({marks})"
        return dict(self._db.execute(query, positions).fetchall())

    def metadata(self, position: int) -> bytes | None:
        row = self._db.execute("SELECT metadata FROM docs WHERE position = ?", (position,)).fetchone()
        return row[0] if row else None

    def matching(self, key: str) -> set[int]:
        """Positions of the documents whose metadata has this condition's value."""
        rows = self._db.execute("SELECT position FROM postings WHERE key = ?", (key,))
        return {position for (position,) in rows}

    def dead(self) -> list[int]:
        return [position for (position,) in self._db.execute("SELECT position FROM dead")]

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM docs").fetchone()[0]


def write_docs(
    path: Path,
    rows: Iterable[tuple[int, int, str, bytes | None]],
    dead: Iterable[int] = (),
    copy_from: Path | None = None,
    drop: Iterable[int] = (),
    renumber: bool = False,
) -> None:
    """Write a snapshot's documents file: `rows` are (position, int_id, doc_id, metadata).

    With `copy_from`, start from that snapshot's documents without the positions in `drop`:
    at the same positions, or, with `renumber`, at positions 0, 1, ... in their order (the
    vectors of a rebuilt index are in that order).
    """
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.executescript(SCHEMA)
        if copy_from is not None:
            db.execute("ATTACH DATABASE ? AS old", (f"file:{copy_from}?mode=ro&immutable=1",))
            db.execute("CREATE TEMP TABLE dropped (position INTEGER PRIMARY KEY)")
            db.executemany("INSERT INTO dropped VALUES (?)", ((p,) for p in drop))
            db.execute(
                "CREATE TEMP TABLE moved AS SELECT position AS old,"
                f" {'ROW_NUMBER() OVER (ORDER BY position) - 1' if renumber else 'position'} AS new"
                " FROM old.docs WHERE position NOT IN (SELECT position FROM dropped)"
            )
            db.execute("CREATE INDEX temp.moved_old ON moved (old)")
            db.execute(
                "INSERT INTO docs SELECT m.new, d.int_id, d.doc_id, d.metadata"
                " FROM old.docs d JOIN moved m ON m.old = d.position ORDER BY m.new"
            )
            db.execute(
                "INSERT INTO postings SELECT p.key, m.new"
                " FROM old.postings p JOIN moved m ON m.old = p.position ORDER BY p.key, m.new"
            )
            db.commit()
            db.execute("DETACH DATABASE old")
        db.executemany("INSERT OR IGNORE INTO dead VALUES (?)", ((p,) for p in dead))
        for position, int_id, doc_id, metadata in rows:
            db.execute(
                "INSERT INTO docs VALUES (?, ?, ?, ?)",
                (position, int_id, doc_id, metadata if metadata not in (b"", b"{}") else None),
            )
            db.executemany(
                "INSERT INTO postings VALUES (?, ?)", ((key, position) for key in filter_keys(metadata))
            )
        db.create_function("namespace_of", 1, namespace_of, deterministic=True)
        db.execute(
            "INSERT INTO namespaces SELECT namespace_of(doc_id) AS owner, position FROM docs"
            " ORDER BY owner, position"
        )
        db.execute("INSERT INTO owners SELECT owner, count(*) FROM namespaces GROUP BY owner")
        db.commit()
    finally:
        db.close()
