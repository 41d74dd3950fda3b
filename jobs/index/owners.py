"""Whose documents: every document belongs to the owner (an API key's name) that wrote it.

There is one physical index. With INDEX_SCOPE=key (the default) each owner has a namespace of
its own: a document is stored under `<owner>/<id>` (a client's id cannot hold a `/`), the
replicas index each document's namespace like a metadata value, and a search is a filtered
search of the caller's namespace. The same id under two keys is two documents.

The open API's owner, `public`, stores documents under their bare id, as every document was
stored before documents had owners: an open deployment, and the documents it already holds,
are unchanged, and documents written before owners belong to `public`.

With INDEX_SCOPE=shared every id is bare: one namespace that every key searches. Each
document's hash records its owner, the only key that may replace or delete it (a document
without one, written before owners, is `public`'s).
"""

from __future__ import annotations

# The owner of everything written through the open API (no API_KEYS): service.security.PUBLIC.
PUBLIC = "public"

KEY = "key"
SHARED = "shared"
SCOPES = (KEY, SHARED)


def stored_id(scope: str, owner: str, doc_id: str) -> str:
    """The id a document is stored under in Redis and in the replicas."""
    if scope == SHARED or owner == PUBLIC:
        return doc_id
    return f"{owner}/{doc_id}"


def client_id(stored: str) -> str:
    """The id its owner knows a stored document by."""
    return stored.rpartition("/")[2]


def namespace_of(stored: str) -> str:
    """The namespace a stored id belongs to (the owner's name; bare ids are `public`'s)."""
    head, slash, _ = stored.partition("/")
    return head if slash else PUBLIC
