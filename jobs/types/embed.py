"""The `embed` job: encode documents and write them, with their vectors, to the index."""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator
from rq import get_current_job

from jobs.connection import connect
from jobs.settings import get_settings
from jobs.types.progress import report_progress
from jobs.types.schema import JobInput, limits, within

DOCUMENT_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,256}$"


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
        if metadata is None:
            return None
        limit = limits(info).max_metadata_bytes
        size = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())
        if size > limit:
            raise ValueError(f"metadata is {size} bytes as JSON; the limit is {limit}")
        return metadata


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


def describe_embed(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"document_ids": [document["id"] for document in kwargs["documents"]]}


def embed_documents(documents: list[dict[str, Any]], revision: int) -> dict[str, Any]:
    """Encode the texts in batches, then write every document and vector in one atomic step.

    Safe to run again after a crash at any point: documents are keyed by id, and a rewrite
    with the same revision changes nothing.
    """
    from jobs.index.batching import forget, vectors_for
    from jobs.index.embedding import get_encoder
    from jobs.index.store import DocumentStore

    count = len(documents)
    report_progress(0, f"encoding {count} document{'s' if count != 1 else ''}")
    encoder = get_encoder()
    texts = [document["text"] for document in documents]
    job = get_current_job()
    if job is None:
        connection = connect(role="worker")
        vectors = encoder.encode(texts)
    else:
        connection = job.connection
        # Encoded together with the embed jobs queued behind this one (jobs.index.batching).
        prefetch = get_settings().embed_prefetch
        vectors = vectors_for(connection, job.id, texts, encoder, prefetch, job.func_name)
    report_progress(80, "writing to the index")
    outcome = DocumentStore(connection).upsert(documents, vectors, revision, model=encoder.name)
    if job is not None:
        forget(connection, job.id)
    report_progress(100, f"indexed {count} document{'s' if count != 1 else ''}")
    indexed = [d["id"] for d, result in zip(documents, outcome, strict=True) if result == "indexed"]
    superseded = [d["id"] for d, result in zip(documents, outcome, strict=True) if result == "superseded"]
    return {"indexed": indexed, "superseded": superseded}
