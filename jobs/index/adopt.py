"""Give the open API's documents to one API key: `python -m jobs.index.adopt OWNER`.

Documents written before documents had owners, and any written through the open API (no
API_KEYS), are `public`'s (jobs.index.owners). Once API_KEYS is set no caller is `public`:
with INDEX_SCOPE=key no key sees them, with INDEX_SCOPE=shared every key can read and search
them but none may replace or delete them. This makes them OWNER's: the name of a key, as
`GET /index` reports it to that key (`caller.owner`).

With INDEX_SCOPE=key each document moves into OWNER's namespace: it is written under its new
id, with the vector a replica of the index holds and a new revision, and then deleted under
the old one, a batch at a time (if the command stops half way, running it again moves the
rest). With INDEX_SCOPE=shared ids stay: each document records OWNER as its owner. The key's
caps do not apply: the operator decides.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import redis

from jobs import keys
from jobs.index.owners import PUBLIC, SHARED, namespace_of
from jobs.index.store import DocumentStore, new_revision
from jobs.settings import Settings

# Documents read, moved and deleted per step.
BATCH = 256
OWNER = re.compile(r"key-[0-9a-f]{16}")


def public_ids(connection: redis.Redis) -> list[str]:
    """The stored ids of `public`'s documents (every live document has an integer id)."""
    return [
        stored
        for stored in (raw.decode() for raw, _ in connection.hscan_iter(keys.INDEX_INT_IDS, count=1000))
        if namespace_of(stored) == PUBLIC
    ]


def adopt(connection: redis.Redis, owner: str, settings: Settings) -> int:
    """Make `public`'s documents `owner`'s; returns how many."""
    store = DocumentStore(connection, scope=settings.index_scope)
    stored_ids = public_ids(connection)
    if settings.index_scope == SHARED:
        batches = (stored_ids[start : start + BATCH] for start in range(0, len(stored_ids), BATCH))
        return sum(store.give_public(batch, owner) for batch in batches)
    if not stored_ids:
        return 0
    from jobs.index.replica import Replica

    model, dimensions = connection.hmget(keys.INDEX_CONFIG, "model", "dimensions")
    with tempfile.TemporaryDirectory() as directory:
        replica = Replica(connection, int(dimensions), directory=Path(directory))
        replica.load()
        moved = 0
        for start in range(0, len(stored_ids), BATCH):
            batch = stored_ids[start : start + BATCH]
            replica.sync()
            int_ids = connection.hmget(keys.INDEX_INT_IDS, batch)
            documents, vectors = [], []
            for document, int_id in zip(store.get_stored(batch), int_ids, strict=True):
                vector = replica.vector(int(int_id)) if document is not None and int_id is not None else None
                if vector is not None:  # else deleted meanwhile
                    documents.append(
                        {"id": document.id, "text": document.text, "metadata": document.metadata}
                    )
                    vectors.append(vector)
            if not documents:
                continue
            outcome = store.upsert(documents, np.stack(vectors), new_revision(), model.decode(), owner=owner)
            for document, result in zip(documents, outcome, strict=True):
                if result == "indexed" and store.delete(document["id"], owner=PUBLIC):
                    moved += 1
        return moved


def main(argv: list[str] | None = None) -> int:
    from jobs.connection import connect
    from jobs.settings import get_settings

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("owner", help="the key's name: key- and 16 hex digits (GET /index: caller.owner)")
    args = parser.parse_args(argv)
    if not OWNER.fullmatch(args.owner):
        parser.error("OWNER is a key's name, key- and 16 hex digits, as GET /index reports it (caller.owner)")
    settings = get_settings()
    count = adopt(connect(settings, role="tool"), args.owner, settings)
    print(f"{count} document(s) of the open API are {args.owner}'s now ({settings.index_scope} scope)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
