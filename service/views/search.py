"""Semantic search and the documents behind it, as the calling key sees them (jobs.index.owners)."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from jobs import keys
from jobs.index.owners import KEY
from jobs.index.store import DocumentStore, NotOwnerError, QuotaExceededError
from jobs.refusals import validate
from jobs.types.embed import DOCUMENT_ID, check_metadata
from jobs.types.schema import limits, within
from service.body import query_args, read_json_object
from service.errors import ApiError, error_response
from service.replication import acknowledges_writes
from service.security import current_owner
from service.state import get_state

bp = Blueprint("search", __name__)


class _Query(BaseModel):
    k: int = Field(default=10, ge=1, description="How many results: 1 to MAX_K (100).")

    @field_validator("k")
    @classmethod
    def _k_fits(cls, k: int, info: ValidationInfo) -> int:
        if k > limits(info).max_k:
            raise ValueError(f"k must be at most {limits(info).max_k}")
        return k


class SearchParams(_Query):
    """`GET /search?q=…&k=…`"""

    model_config = ConfigDict(extra="forbid")
    q: str = Field(min_length=1, description="What to look for, in plain words (at most MAX_QUERY_CHARS).")

    @field_validator("q")
    @classmethod
    def _q_fits(cls, q: str, info: ValidationInfo) -> str:
        return within(q, limits(info).max_query_chars, "the query", blank_ok=False)


class SearchBody(_Query):
    """`POST /search` body, for long queries and filters."""

    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(min_length=1, description="What to look for (at most MAX_TEXT_CHARS).")
    filter: dict[str, Any] | None = Field(
        default=None,
        description='Metadata fields that results must equal, e.g. {"lang": "en"}: at most '
        "MAX_METADATA_FIELDS fields and MAX_METADATA_BYTES as JSON, as metadata.",
    )

    @field_validator("query")
    @classmethod
    def _query_fits(cls, query: str, info: ValidationInfo) -> str:
        return within(query, limits(info).max_text_chars, "the query", blank_ok=False)

    @field_validator("filter")
    @classmethod
    def _filter_fits(cls, where: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        return None if where is None else check_metadata(where, limits(info), "the filter")


@bp.get("/search")
def search_get() -> Response:
    params = validate(SearchParams, query_args(), context={"settings": get_state().settings})
    return _search(params.q, params.k, None)


@bp.post("/search")
def search_post() -> Response:
    body = validate(SearchBody, read_json_object(), context={"settings": get_state().settings})
    return _search(body.query, body.k, body.filter)


def search_cost(query: str, k: int, where: dict[str, Any] | None = None) -> int:
    """What a search costs of its key's budget (SEARCH_BUDGET): the model's work grows with the
    query's length, the reads with k, and each filter field is a lookup in every part of the
    index (the snapshot's inverted index and each process's own)."""
    return 1 + len(query) // 500 + k // 25 + len(where or ())


def _charge(state: Any, owner: str, cost: int) -> None:
    """Spend `cost` of the key's search budget for this minute; 429 once it is spent."""
    budget = state.settings.search_budget
    if not budget or not state.settings.api_keys:
        return
    now = time.time()
    window = int(now // 60)
    with state.redis.pipeline(transaction=False) as pipe:
        pipe.incrby(keys.search_spent(owner, window), cost)
        pipe.expire(keys.search_spent(owner, window), 120)
        spent, _ = pipe.execute()
    if spent > budget:
        state.redis.decrby(keys.search_spent(owner, window), cost)  # a refused search costs nothing
        raise ApiError(
            429,
            f"This API key has spent its search budget for this minute ({budget} units; a search "
            "costs 1, plus 1 per 500 characters of query, 1 per 25 results and 1 per filter "
            "field). Retry after the time in Retry-After.",
            code="search_budget_exceeded",
            headers={"Retry-After": str(max(1, int((window + 1) * 60 - now) + 1))},
        )


def _search(query: str, k: int, where: dict[str, Any] | None) -> Response:
    state = get_state()
    owner = current_owner()
    _charge(state, owner, search_cost(query, k, where))
    started = time.perf_counter()
    namespace = owner if state.settings.index_scope == KEY else None
    hits = state.search.search(query, k, where, namespace)
    documents = DocumentStore(state.redis).get_stored([stored for stored, _ in hits])
    results = [
        {"id": document.id, "score": round(score, 6), "text": document.text, "metadata": document.metadata}
        for (_, score), document in zip(hits, documents, strict=True)
        if document is not None  # deleted since the replica last synced
    ]
    return jsonify(results=results, took_ms=round((time.perf_counter() - started) * 1000, 2))


def _store() -> DocumentStore:
    state = get_state()
    return DocumentStore.for_settings(state.redis, state.settings)


@bp.get("/documents/<doc_id>")
def read_document(doc_id: str) -> Response:
    document = _store().get(doc_id, current_owner()) if DOCUMENT_ID.fullmatch(doc_id) else None
    if document is None:
        raise ApiError(404, "No such document.")
    return jsonify(document.to_json())


@bp.delete("/documents/<doc_id>")
@acknowledges_writes
def delete_document(doc_id: str) -> Response:
    try:
        deleted = DOCUMENT_ID.fullmatch(doc_id) and _store().delete(doc_id, owner=current_owner())
    except NotOwnerError:
        # INDEX_SCOPE=shared: every key can read it, so saying that it exists tells nothing new.
        raise ApiError(
            403, "This document belongs to another API key: only the key that wrote it may delete it."
        ) from None
    if not deleted:
        raise ApiError(404, "No such document.")
    return jsonify(id=doc_id, deleted=True)


@bp.get("/index")
def index_info() -> Response:
    state = get_state()
    store = _store()
    stats = store.stats()
    if stats["dimensions"] is None:
        from jobs.index.embedding import model_dimensions

        stats["dimensions"] = model_dimensions()
    stats["model"] = stats["model"] or state.settings.embed_model_name
    stats["scope"] = state.settings.index_scope
    owner = current_owner()
    stats["caller"] = {"owner": owner, **store.usage(owner).to_json()}
    replica = state.search.loaded_replica
    stats["replica"] = {
        "status": state.search.status,
        "documents": len(replica) if replica is not None else None,
        "version": replica.version if replica is not None else None,
        "snapshot_version": (replica.base_version or None) if replica is not None else None,
        "search": ("approximate" if replica.approximate else "exact") if replica is not None else None,
    }
    return jsonify(stats)


@bp.app_errorhandler(QuotaExceededError)
def document_caps_exceeded(error: QuotaExceededError) -> Response:
    """An embed request that would take its key past its document caps (checked at submit)."""
    usage = error.usage
    caps = [f"{usage.max_documents} documents"] if usage.max_documents else []
    caps += [f"{usage.max_bytes / 2**20:g} MB"] if usage.max_bytes else []
    return error_response(
        429,
        f"This API key stores {usage.documents} documents ({usage.bytes / 2**20:.1f} MB of text and "
        f"metadata); this request would add {error.documents} documents and {error.size} bytes, past "
        f"its limits of {' and '.join(caps)}. Delete documents to make room.",
        code="quota_exceeded",
        details={**usage.to_json(), "request_documents": error.documents, "request_bytes": error.size},
    )
