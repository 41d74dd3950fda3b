"""The `embed` job: encode documents and write them, with their vectors, to the index.

Documents belong to the key that submits them (jobs.index.owners): the job's arguments name
its owner, and `admit_embed` checks the key's document caps at submit.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator
from redis import Redis
from rq import get_current_job

from jobs.connection import connect
from jobs.index.owners import PUBLIC
from jobs.settings import Settings, get_settings
from jobs.types.progress import report_progress
from jobs.types.schema import JobInput, limits, within

# A document id, whole. Python code must `fullmatch` DOCUMENT_ID (with `re.match`, `$` also
# matches before a trailing newline); the anchored pattern is for pydantic's Rust regex and
# the OpenAPI spec, where `$` is the end of the text.
DOCUMENT_ID_CHARS = r"[A-Za-z0-9._:-]{1,256}"
DOCUMENT_ID_PATTERN = rf"^{DOCUMENT_ID_CHARS}$"
DOCUMENT_ID = re.compile(DOCUMENT_ID_CHARS)


def check_metadata(metadata: dict[str, Any], settings: Settings, name: str = "metadata") -> dict[str, Any]:
    """Metadata, or a search filter on it, within MAX_METADATA_BYTES and MAX_METADATA_FIELDS.

    Every field is indexed for filters in every web process, so their number is bounded; a
    filter beyond these bounds could match no document.
    """
    limit = settings.max_metadata_bytes
    size = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limit:
        raise ValueError(f"{name} is {size} bytes as JSON; the limit is {limit}")
    if len(metadata) > settings.max_metadata_fields:
        raise ValueError(f"{name} has {len(metadata)} fields; the limit is {settings.max_metadata_fields}")
    return metadata


class DocumentInput(JobInput):
    id: str | None = Field(
        default=None,
        pattern=DOCUMENT_ID_PATTERN,
        description="1-256 characters of A-Z a-z 0-9 . _ : -; assigned by the server when absent.",
    )
    text: str = Field(min_length=1, description="The text to embed and return in search results.")
    metadata: dict[str, Any] | None = Field(
        default=None, description="A small JSON object; searches can filter on its fields."
    )

    @field_validator("text")
    @classmethod
    def _text_fits(cls, text: str, info: ValidationInfo) -> str:
        return within(text, limits(info).max_text_chars, "text", blank_ok=False)

    @field_validator("metadata")
    @classmethod
    def _metadata_fits(cls, metadata: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        return None if metadata is None else check_metadata(metadata, limits(info))


class EmbedInput(JobInput):
    documents: list[DocumentInput] = Field(min_length=1, description="Documents to index.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # {"text", "id"?, "metadata"?} stands for a single document.
        if isinstance(data, dict) and "documents" not in data and "text" in data:
            data = dict(data)
            document = {name: data.pop(name) for name in ("id", "text", "metadata") if name in data}
            data["documents"] = [document]
        return data

    @field_validator("documents")
    @classmethod
    def _documents_fit(cls, documents: list[DocumentInput], info: ValidationInfo) -> list[DocumentInput]:
        limit = limits(info).max_documents
        if len(documents) > limit:
            raise ValueError(f"{len(documents)} documents in one request; the limit is {limit}")
        seen: set[str] = set()
        for document in documents:
            if document.id is not None:
                if document.id in seen:
                    raise ValueError(f"document id {document.id!r} appears twice")
                seen.add(document.id)
        return documents


def prepare_embed(fields: dict[str, Any]) -> dict[str, Any]:
    """Give every document an id and stamp the request's revision, at submit time."""
    from jobs.index.store import new_revision

    documents = [
        dict(document, id=document.get("id") or uuid.uuid4().hex) for document in fields["documents"]
    ]
    return {"documents": documents, "revision": new_revision()}


def admit_embed(kwargs: dict[str, Any], owner: str, connection: Redis, settings: Settings) -> None:
    """At submit, with API keys: refuse a request that would take its key past its document
    caps (QuotaExceededError)."""
    from jobs.index.store import DocumentStore

    if settings.api_keys:
        DocumentStore.for_settings(connection, settings).check_room(owner, kwargs["documents"])


def describe_embed(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"document_ids": [document["id"] for document in kwargs["documents"]]}


def embed_documents(documents: list[dict[str, Any]], revision: int, owner: str = PUBLIC) -> dict[str, Any]:
    """Encode the texts, then write every document and vector in one atomic step, as `owner`'s
    (jobs accepted before documents had owners have none: `public`, as they were written then).

    Safe to run again after a crash at any point: documents are keyed by id, and a rewrite
    with the same revision changes nothing.
    """
    from jobs.index.embedding import get_encoder
    from jobs.index.store import DocumentStore

    count = len(documents)
    report_progress(0, f"encoding {count} document{'s' if count != 1 else ''}")
    encoder = get_encoder()
    vectors = encoder.encode([document["text"] for document in documents])
    report_progress(80, "writing to the index")
    job = get_current_job()
    connection = job.connection if job is not None else connect(role="worker")
    store = DocumentStore.for_settings(connection, get_settings())
    outcome = store.upsert(documents, vectors, revision, model=encoder.name, owner=owner)
    report_progress(100, _indexed_message(count))
    return _result(documents, outcome)


def embed_many(calls: list[dict[str, Any]], connection: Redis) -> list[dict[str, Any]]:
    """Several embed jobs at once (`calls`: each job's keyword arguments; one result each).

    One encode of all their texts (the encoders sort texts by length into batches), and one
    atomic write of all their documents, each at its own job's revision. All or nothing: if
    this raises, the worker runs the jobs one by one, so each ends on its own merits.
    """
    from jobs.index.embedding import get_encoder
    from jobs.index.store import DocumentStore

    encoder = get_encoder()
    documents = [document for call in calls for document in call["documents"]]
    revisions = [call["revision"] for call in calls for _ in call["documents"]]
    writers = [call.get("owner", PUBLIC) for call in calls for _ in call["documents"]]
    vectors = encoder.encode([document["text"] for document in documents])
    store = DocumentStore.for_settings(connection, get_settings())
    outcome = store.upsert(documents, vectors, revisions, model=encoder.name, owner=writers)
    results, start = [], 0
    for call in calls:
        end = start + len(call["documents"])
        results.append(_result(call["documents"], outcome[start:end]))
        start = end
    return results


def embed_progress(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The progress an embed job run in a batch ends with: what `embed_documents` reports last."""
    return {"percent": 100.0, "message": _indexed_message(len(kwargs["documents"]))}


def _indexed_message(count: int) -> str:
    return f"indexed {count} document{'s' if count != 1 else ''}"


# A document's outcome: written; not written because a newer request changed it first, it is
# another key's (INDEX_SCOPE=shared), or its key is at a cap (KEY_MAX_DOCUMENTS, _MB).
OUTCOMES = ("indexed", "superseded", "refused", "quota_exceeded")


def _result(documents: list[dict[str, Any]], outcome: list[str]) -> dict[str, Any]:
    pairs = list(zip(documents, outcome, strict=True))
    return {name: [document["id"] for document, result in pairs if result == name] for name in OUTCOMES}
