"""The OpenAPI 3.1 description at /openapi.json, built from the schemas that validate requests.

Request bodies come from the same pydantic models the views validate with (each job type's
input plus the common options, the search models); answers from the response models below.
`/docs` serves Swagger UI (bundled by flask-swagger-ui, nothing loaded from the network).

Both answer without an API key, on purpose: the spec describes shapes (routes, job types,
limits) and holds no job, document, key or Redis detail, a client needs it before it has a
key, and Swagger UI must load it before anyone can enter a key under "Authorize".
"""

from __future__ import annotations

from typing import Any, Literal

from flask import Blueprint, Flask, Response, jsonify
from flask_swagger_ui import get_swaggerui_blueprint
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from jobs.submission import request_model
from service.state import AppState, get_state
from service.views.batches import MAX_WAIT_SECONDS as MAX_BATCH_WAIT
from service.views.batches import BatchBody
from service.views.jobs import MAX_TYPE_NAME, MAX_WAIT_SECONDS, BulkRetried, BulkRetry, ListQuery, QueueName
from service.views.schedules import ScheduleBody, ScheduleDeleted, ScheduleList, ScheduleView
from service.views.search import SearchBody

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
Status = Literal[
    "queued", "rate_limited", "started", "finished", "failed", "deferred", "scheduled", "canceled", "stopped"
]


class Progress(BaseModel):
    percent: float = Field(ge=0, le=100)
    message: str


class JobError(BaseModel):
    type: str = Field(
        description="JobTimeout, JobStopped, WorkerDied, WorkerShutdown, or the exception's name."
    )
    message: str


class CallbackState(BaseModel):
    """A job's completion webhook and how its delivery went."""

    url: str
    status: Literal["pending", "retrying", "delivered", "failed", "refused"] = Field(
        description=(
            "pending: the job has not ended, or its end is about to be sent; retrying: an attempt "
            "failed and another follows; delivered: a 2xx answer; failed: CALLBACK_RETRY_FOR "
            "passed without one; refused: the host resolved to an address that is not allowed."
        )
    )
    attempts: int = Field(ge=0, description="Attempts to deliver the job's latest end.")
    last_error: str | None
    delivered_at: str | None = Field(json_schema_extra={"format": "date-time"})


class JobView(BaseModel):
    """A job as `GET /jobs/<id>` shows it (and as a completion webhook receives it)."""

    id: str
    type: str | None
    status: Status
    queue: QueueName = Field(
        description="The RQ queue the job is on, as GET /queues names it: an embed job submitted "
        'with `"queue": "high"` is on `embed-high`.'
    )
    progress: Progress | None
    result: Any = Field(description="The job function's return value once the job is finished.")
    error: JobError | None = Field(description="The latest failed attempt's error, until the job finishes.")
    attempts: int = Field(ge=0)
    retries_left: int = Field(ge=0)
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    enqueued_at: str | None
    started_at: str | None
    ended_at: str | None = Field(description="When the job finished, failed, was stopped or canceled.")
    scheduled_for: str | None = Field(
        description="While `scheduled`: when the job (delayed, or a failed attempt's retry) is due to be "
        "queued; otherwise null.",
        json_schema_extra={"format": "date-time"},
    )
    callback: CallbackState | None = Field(
        description="The completion webhook, when the job has a callback_url."
    )
    document_ids: list[str] | None = Field(
        default=None, description="Embed jobs: the ids of their documents."
    )
    depends_on: list[str] | None = Field(
        default=None,
        description="Jobs submitted with `depends_on`: the ids of the jobs this one waits for "
        "(it is `deferred` until they end).",
    )
    allow_failure: bool | None = Field(
        default=None,
        description="Jobs with `depends_on`: whether it runs even if one of them does not finish.",
    )


class WebhookSecret(BaseModel):
    """The secret the calling key's completion webhooks are signed with."""

    owner: str = Field(description="The key's owner name (`public` while the API is open without keys).")
    secret: str = Field(
        description="HMAC-SHA256 key (as text) of the key's deliveries' `Afterward-Signature`: "
        "over `<Afterward-Timestamp>\\n<Afterward-Delivery>\\n<Afterward-Event>\\n<body>`."
    )


class JobList(BaseModel):
    jobs: list[JobView]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class Error(BaseModel):
    """Every error, from every route."""

    error: ErrorBody


class SearchResult(BaseModel):
    id: str
    score: float = Field(description="Cosine similarity, -1 to 1: higher is closer.")
    text: str
    metadata: dict[str, Any]


class SearchAnswer(BaseModel):
    results: list[SearchResult]
    took_ms: float


class DocumentView(BaseModel):
    id: str
    text: str
    metadata: dict[str, Any]
    updated_at: str


class Deleted(BaseModel):
    id: str
    deleted: bool


class ReplicaInfo(BaseModel):
    status: Literal["ready", "loading", "cold"]
    documents: int | None
    version: int | None
    snapshot_version: int | None = Field(description="The snapshot this process maps.")
    search: Literal["exact", "approximate"] | None = Field(
        description="How the snapshot's vectors are searched: exhaustively, or in an HNSW graph."
    )


class SnapshotInfo(BaseModel):
    version: int
    documents: int
    search: Literal["exact", "approximate"]
    created_at: str


class CallerDocuments(BaseModel):
    owner: str = Field(description="The calling key's name (`public` when the API is open).")
    documents: int = Field(description="Documents the key stores.")
    bytes: int = Field(description="Bytes of their text and metadata.")
    max_documents: int | None = Field(description="KEY_MAX_DOCUMENTS; null: no cap.")
    max_bytes: int | None = Field(description="KEY_MAX_DOCUMENT_MB in bytes; null: no cap.")


class IndexInfo(BaseModel):
    documents: int = Field(description="Documents in the whole index, every key's.")
    version: int
    model: str
    dimensions: int
    scope: Literal["key", "shared"] = Field(
        description="INDEX_SCOPE: `key`, each key searches its own documents; `shared`, every key's."
    )
    caller: CallerDocuments
    snapshot: SnapshotInfo | None = Field(description="The latest snapshot in Redis; null before the first.")
    replica: ReplicaInfo


class QueueWorker(BaseModel):
    name: str
    state: str
    last_heartbeat: str
    current_jobs: list[str] = Field(description="The jobs it runs that belong to the caller's key.")


class QueueCounts(BaseModel):
    queued: int
    started: int
    scheduled: int
    deferred: int
    failed: int = Field(
        description="Failed jobs (stopped ones are counted apart, though RQ keeps them together)."
    )
    stopped: int = Field(description="Jobs stopped by DELETE /jobs/<id> while they ran.")
    finished: int


class QueueInfo(BaseModel):
    name: str
    process_type: Literal["worker", "embedder"]
    counts: QueueCounts = Field(description="Jobs by state, of every key.")
    oldest_queued_seconds: float | None = Field(
        description="Age of the oldest queued job; null when none is."
    )
    workers: list[QueueWorker] = Field(description="Live workers serving the queue.")
    paused: bool = Field(description="Paused by an operator: workers take none of its jobs.")
    paused_at: str | None = Field(description="When it was paused; null when it is not.")


class QueueList(BaseModel):
    queues: list[QueueInfo]


class QueueState(BaseModel):
    """A queue's pause: POST /queues/<name>/pause and /resume answer it."""

    name: str
    paused: bool = Field(description="Workers take none of its jobs; running ones run on, submissions wait.")
    paused_at: str | None = Field(description="When the pause began (a second keeps it); null if not paused.")
    paused_by: str | None = Field(
        description="Owner name of the key that paused it (`public` without API_KEYS); null if not paused."
    )


class Health(BaseModel):
    status: Literal["ok"]


class ReadyChecks(BaseModel):
    redis: Literal["ok", "unreachable"]
    redis_eviction_policy: str | None = Field(
        default=None, description="Redis's maxmemory-policy; anything but noeviction is a warning."
    )
    search: Literal["ready", "warming", "cold", "off"] = Field(
        description="This process's model and index replica: `warming` until loaded; `off`: "
        "SEARCH_WARMUP=0 (loaded on the first search, not a readiness condition)."
    )
    workers: int | None = Field(
        description="Live `worker` processes serving high, default and low; null when Redis is unreachable."
    )
    embedders: int | None = Field(
        description="Live `embedder` processes serving the embed queues; null when Redis is unreachable."
    )


class Ready(BaseModel):
    """`/readyz`: ready to serve when Redis answers and search is loaded; missing workers or
    embedders are reported and warned about but do not make it 503."""

    status: Literal["ready"]
    checks: ReadyChecks
    warnings: list[str]


class BatchCounts(BaseModel):
    """A batch's jobs by status; `expired`: ended and gone since (RESULT_TTL after its end)."""

    queued: int
    rate_limited: int
    started: int
    finished: int
    failed: int
    deferred: int
    scheduled: int
    canceled: int
    stopped: int
    expired: int


class BatchAccepted(BaseModel):
    """`POST /batches` answer: the batch, and its jobs' ids in the order they were sent."""

    id: str
    total: int
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    job_ids: list[str]
    callback: dict[str, Any] | None = Field(description="`{url, status: pending}` with a callback_url.")


class BatchView(BaseModel):
    """A batch as `GET /batches/<id>` shows it, and as its `batch.ended` callback receives it."""

    id: str
    total: int
    counts: BatchCounts
    done: bool = Field(description="Every job has ended (finished, failed, stopped or canceled).")
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    ended_at: str | None = Field(description="When the last job ended; null until then.")
    job_ids: list[str] = Field(description="Every job of the batch, in the order they were sent.")
    callback: CallbackState | None = Field(description="The `batch.ended` webhook, with a callback_url.")


def build(state: AppState) -> dict[str, Any]:
    settings = state.settings
    requests = {
        name: request_model(name, job_type, settings.max_job_timeout, settings.max_delay)
        for name, job_type in sorted(state.job_types.items())
    }
    models: list[type[BaseModel]] = [*requests.values(), SearchBody, BulkRetry, ScheduleBody, BatchBody]
    responses = [
        JobView,
        JobList,
        BulkRetried,
        Error,
        SearchAnswer,
        DocumentView,
        Deleted,
        IndexInfo,
        QueueList,
        QueueState,
        WebhookSecret,
        Health,
        Ready,
        ScheduleView,
        ScheduleList,
        ScheduleDeleted,
        BatchAccepted,
        BatchView,
    ]
    _, schemas = models_json_schema(
        [(model, "validation") for model in models] + [(model, "serialization") for model in responses],
        ref_template=REF,
    )
    components = schemas.get("$defs", {})
    paths: dict[str, Any] = {}
    for name, model in requests.items():
        paths[f"/jobs/{name}"] = {
            "post": _operation(
                f"Submit a {name} job",
                {"202": _json("JobView", "Accepted: the job and its status URL (Location)."),
                 "200": _json("JobView", "An idempotent repeat: the job the first request created.")},
                body=model.__name__,
                parameters=[_header("Idempotency-Key", "Repeats with the same key return the same job.")],
                secured=True,
                tag="jobs",
            )
        }  # fmt: skip
    job_id = _path("job_id", "A job id.")
    paths["/jobs/{job_id}"] = {
        "get": _operation(
            "A job's status, progress, result or error",
            {"200": _json("JobView", "The job.")},
            parameters=[job_id, _query("wait", {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS},
                                       "Seconds to wait for the job to end (long poll).")],
            secured=True,
            tag="jobs",
        ),
        "delete": _operation(
            "Cancel a job (or stop it if it runs)",
            {"200": _json("JobView", "Canceled or stopped."), "202": _json("JobView", "Stopping."),
             "409": _json("Error", "The job has already ended (finished, failed, stopped or canceled).")},
            parameters=[job_id],
            secured=True,
            tag="jobs",
        ),
    }  # fmt: skip
    paths["/jobs/{job_id}/retry"] = {
        "post": _operation("Run a failed or stopped job again", {"202": _json("JobView", "Queued again.")},
                           parameters=[job_id], secured=True, tag="jobs")
    }  # fmt: skip
    paths["/jobs/retry"] = {
        "post": _operation(
            "Run the caller's failed (or stopped) jobs again, filtered by type, queue and end time",
            {"202": _json("BulkRetried", "Queued again: how many, their ids, and whether more match."),
             "200": _json("BulkRetried", "No job matched: nothing was queued.")},
            body="BulkRetry",
            secured=True,
            tag="jobs",
        )
    }  # fmt: skip
    list_fields = ListQuery.model_json_schema()["properties"]
    statuses = {"type": "string", "enum": list(Status.__args__)}
    query_text = {"type": "string", "minLength": 1, "maxLength": settings.max_query_chars}
    paths["/jobs"] = {
        "get": _operation(
            "Recent jobs, newest first",
            {"200": _json("JobList", "The jobs.")},
            parameters=[
                _query("status", statuses, "Only jobs in this status."),
                _query("queue", {"type": "string", "enum": list(QueueName.__args__)},
                       "Only jobs on this RQ queue (the job view's `queue`)."),
                _query("type", {"type": "string", "minLength": 1, "maxLength": MAX_TYPE_NAME},
                       "Only jobs of this type."),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": list_fields["limit"]["maximum"]},
                       "How many (default 50)."),
                _query("schedule", {"type": "string", "minLength": 1, "maxLength": 64},
                       "Only jobs this schedule's ticks made."),
            ],
            secured=True,
            tag="jobs",
        )
    }  # fmt: skip
    paths["/search"] = {
        "get": _operation(
            "Documents closest in meaning to a query",
            {"200": _json("SearchAnswer", "The closest documents, best first.")},
            parameters=[
                _query("q", query_text, "What to look for.", required=True),
                _query("k", {"type": "integer", "minimum": 1, "maximum": settings.max_k}, "How many (10)."),
            ],
            secured=True,
            tag="search",
        ),
        "post": _operation("The same, for long queries and metadata filters",
                           {"200": _json("SearchAnswer", "The closest documents, best first.")},
                           body="SearchBody", secured=True, tag="search"),
    }  # fmt: skip
    doc_id = _path("doc_id", "A document id.")
    paths["/documents/{doc_id}"] = {
        "get": _operation("An indexed document", {"200": _json("DocumentView", "The document.")},
                          parameters=[doc_id], secured=True, tag="search"),
        "delete": _operation("Remove a document from the index",
                             {"200": _json("Deleted", "Removed."),
                              "403": _json("Error", "INDEX_SCOPE=shared: another key's document.")},
                             parameters=[doc_id], secured=True, tag="search"),
    }  # fmt: skip
    paths["/index"] = {
        "get": _operation("The index: size, model, version", {"200": _json("IndexInfo", "The index.")},
                          secured=True, tag="search")
    }  # fmt: skip
    paths["/queues"] = {
        "get": _operation("Every queue: jobs by state, its oldest queued job's age, the workers serving it",
                          {"200": _json("QueueList", "The queues.")}, secured=True, tag="operations")
    }  # fmt: skip
    queue_name = dict(_path("name", "A queue, as GET /queues names it."),
                      schema={"type": "string", "enum": list(state.queues)})  # fmt: skip
    for action, summary, example in (
        (
            "pause",
            "Pause a queue: workers take none of its jobs until it is resumed (operators' keys)",
            {
                "name": "low",
                "paused": True,
                "paused_at": "2026-12-06T19:30:00.000Z",
                "paused_by": "key-1f0c9a7e52d3b864",
            },
        ),
        (
            "resume",
            "Resume a paused queue: workers take its jobs again at once (operators' keys)",
            {"name": "low", "paused": False, "paused_at": None, "paused_by": None},
        ),
    ):
        answer = _json("QueueState", "The queue's state (the same when it already was).")
        answer["content"]["application/json"]["example"] = example
        paths[f"/queues/{{name}}/{action}"] = {
            "post": _operation(summary,
                               {"200": answer,
                                "403": _json("Error", "`forbidden`: the key is not one of ADMIN_KEYS."),
                                "404": _json("Error", "`not_found`: no such queue.")},
                               parameters=[queue_name], secured=True, tag="operations")
        }  # fmt: skip
    paths["/webhooks/secret"] = {
        "get": _operation("The secret this key's completion webhooks are signed with",
                          {"200": _json("WebhookSecret", "The key's signing secret."),
                           "404": _json("Error", "`callbacks_disabled`: CALLBACK_SECRET is not set.")},
                          secured=True, tag="jobs")
    }  # fmt: skip
    paths.update(_schedule_paths())
    paths["/healthz"] = {"get": _operation("Liveness", {"200": _json("Health", "Up.")}, tag="operations")}
    paths["/readyz"] = {
        "get": _operation("Readiness: Redis answers and search is loaded; workers and embedders reported",
                          {"200": _json("Ready", "Ready."),
                           "503": _json("Error", "Not ready: `details` has reasons and checks.")},
                          tag="operations")
    }  # fmt: skip
    paths["/metrics"] = {
        "get": _operation(
            "Prometheus metrics",
            {"200": {"description": "Metrics in Prometheus's text format.",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            secured=True,
            tag="operations",
        )
    }  # fmt: skip
    paths.update(_batch_paths())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Afterward",
            "version": "1.0",
            "description": "Submit jobs, follow them, search what was embedded. Every error is "
            '`{"error": {"code", "message", "details"?}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "One of API_KEYS."}
            },
        },
    }


_BATCH_EXAMPLE = {
    "jobs": [
        {"type": "log", "message": "first"},
        {"type": "sleep", "seconds": 2, "queue": "high", "retries": 1},
    ],
    "callback_url": "https://hooks.example.com/afterward",
}
_BATCH_VIEW_EXAMPLE = {
    "id": "0f6c5a4b3e2d1c0b9a8f7e6d5c4b3a29",
    "total": 2,
    "counts": {"queued": 0, "rate_limited": 0, "started": 0, "finished": 1, "failed": 1, "deferred": 0,
               "scheduled": 0, "canceled": 0, "stopped": 0, "expired": 0},
    "done": True,
    "created_at": "2026-11-29T08:00:00.000Z",
    "ended_at": "2026-11-29T08:00:02.412Z",
    "job_ids": ["5d2e0c8f4a1b4d7e9f3a6b2c1d0e9f8a", "8b7a6c5d4e3f4a2b9c1d0e8f7a6b5c4d"],
    "callback": {"url": "https://hooks.example.com/afterward", "status": "delivered", "attempts": 1,
                 "last_error": None, "delivered_at": "2026-11-29T08:00:02.530Z"},
}  # fmt: skip


def _batch_paths() -> dict[str, Any]:
    create = _operation(
        "Submit up to 1,000 jobs at once, all or none",
        {"202": _json("BatchAccepted", "Accepted: every job is queued; the batch's URL is in Location."),
         "200": _json("BatchAccepted", "An idempotent repeat: the batch the first request created."),
         "422": _json("Error", "Invalid jobs, each named by its place (`jobs[3].message`); none written."),
         "429": _json("Error", "`quota_exceeded`: the jobs do not all fit in the key share; none written.")},
        body="BatchBody",
        parameters=[_header("Idempotency-Key", "Repeats with the same key return the same batch.")],
        secured=True,
        tag="batches",
    )  # fmt: skip
    create["requestBody"]["content"]["application/json"]["example"] = _BATCH_EXAMPLE
    accepted = {name: _BATCH_VIEW_EXAMPLE[name] for name in ("id", "total", "created_at", "job_ids")}
    accepted["callback"] = {"url": _BATCH_EXAMPLE["callback_url"], "status": "pending"}
    create["responses"]["202"]["content"]["application/json"]["example"] = accepted
    read = _operation(
        "A batch: its jobs counted by status, whether all have ended, its callback",
        {"200": _json("BatchView", "The batch (404 for another key's).")},
        parameters=[_path("batch_id", "A batch id."),
                    _query("wait", {"type": "number", "minimum": 0, "maximum": MAX_BATCH_WAIT},
                           "Seconds to wait for every job to end (long poll).")],
        secured=True,
        tag="batches",
    )  # fmt: skip
    read["responses"]["200"]["content"]["application/json"]["example"] = _BATCH_VIEW_EXAMPLE
    return {"/batches": {"post": create}, "/batches/{batch_id}": {"get": read}}


# What the schedule routes answer, as an example (a log job every five minutes, ticked twice).
SCHEDULE_EXAMPLE = {
    "id": "5d0c3b8e2f7a4c1e9b6d8a7f3e2c1b0a",
    "name": "heartbeat",
    "type": "log",
    "job": {"message": "still here"},
    "cron": "*/5 * * * *",
    "every": None,
    "timezone": "UTC",
    "paused": False,
    "created_at": "2026-11-29T08:01:12.345Z",
    "next_run_at": "2026-11-29T08:15:00.000Z",
    "last_run_at": "2026-11-29T08:10:00.012Z",
    "last_job_id": "9f5c0e1d2b3a4c5d6e7f8a9b0c1d2e3f",
    "runs": 2,
    "refused": 0,
    "last_error": None,
}


def _schedule_paths() -> dict[str, Any]:
    """The schedule routes (service.views.schedules), with examples."""
    schedule_id = _path("schedule_id", "A schedule id.")
    paused = {**SCHEDULE_EXAMPLE, "paused": True, "next_run_at": None}
    one = _json("ScheduleView", "The schedule.", example=SCHEDULE_EXAMPLE)
    refused = _json(
        "Error",
        "`validation_failed`: a bad cron, timezone or every, both or neither, an "
        "unknown type, or a job body POST /jobs/<type> would refuse (fields as `job.<field>`).",
    )
    full = _json("Error", "`quota_exceeded`: the key has KEY_MAX_SCHEDULES schedules.")
    unknown = _json("Error", "No such schedule (another key's included).")
    create = _operation(
        "Submit a job at every tick of a cron expression, or every N seconds",
        {
            "201": _json(
                "ScheduleView",
                "Created: the schedule, its next tick, and its URL (Location).",
                example=SCHEDULE_EXAMPLE,
            ),
            "422": refused,
            "429": full,
        },
        body="ScheduleBody",
        secured=True,
        tag="schedules",
    )
    create["requestBody"]["content"]["application/json"]["examples"] = {
        "cron": {
            "value": {
                "type": "log",
                "job": {"message": "still here"},
                "cron": "*/5 * * * *",
                "name": "heartbeat",
            }
        },
        "every": {"value": {"type": "sleep", "job": {"seconds": 1}, "every": 3600}},
        "timezone": {
            "value": {
                "type": "log",
                "job": {"message": "good morning"},
                "cron": "0 9 * * 1-5",
                "timezone": "Europe/Berlin",
                "paused": True,
            }
        },
    }
    listing = {"schedules": [SCHEDULE_EXAMPLE]}
    return {
        "/schedules": {
            "post": create,
            "get": _operation("The key's schedules, oldest first",
                              {"200": _json("ScheduleList", "The schedules.", example=listing)},
                              secured=True, tag="schedules"),
        },
        "/schedules/{schedule_id}": {
            "get": _operation("A schedule: its next and latest tick, runs, the latest refusal",
                              {"200": one, "404": unknown}, parameters=[schedule_id], secured=True,
                              tag="schedules"),
            "delete": _operation("Delete a schedule (the jobs it made stay)",
                                 {"200": _json("ScheduleDeleted", "Deleted.",
                                               example={"id": SCHEDULE_EXAMPLE["id"], "deleted": True}),
                                  "404": unknown},
                                 parameters=[schedule_id], secured=True, tag="schedules"),
        },
        "/schedules/{schedule_id}/pause": {
            "post": _operation("Pause a schedule: no job from its next tick on",
                               {"200": _json("ScheduleView", "Paused (`next_run_at` null).",
                                             example=paused),
                                "404": unknown},
                               parameters=[schedule_id], secured=True, tag="schedules"),
        },
        "/schedules/{schedule_id}/resume": {
            "post": _operation("Resume a schedule from its first tick after now (no catch-up)",
                               {"200": _json("ScheduleView", "Resumed.", example=SCHEDULE_EXAMPLE),
                                "404": unknown},
                               parameters=[schedule_id], secured=True, tag="schedules"),
        },
    }  # fmt: skip


def _json(schema: str, description: str, example: Any = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": {"$ref": REF.format(model=schema)}}
    if example is not None:
        content["example"] = example
    return {"description": description, "content": {"application/json": content}}


def _operation(
    summary: str,
    responses: dict[str, Any],
    body: str | None = None,
    parameters: list[dict[str, Any]] | None = None,
    secured: bool = False,
    tag: str = "jobs",
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "parameters": [
            *(parameters or []),
            _header("X-Request-ID", "Carried by the request's log events; echoed."),
        ],
        "responses": {
            **responses,
            "default": _json(
                "Error",
                "An error (4xx, or 503: Redis is unreachable, or with REDIS_MIN_REPLICAS a write "
                "is not confirmed on that many replicas, `not_replicated`).",
            ),
        },
    }
    if body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=body)}}},
        }
    if secured:
        operation["security"] = [{"apiKey": []}, {}]  # {}: when API_KEYS is unset the API is open
    return operation


def _path(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _query(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(build(get_state()))


def init_openapi(app: Flask) -> None:
    app.register_blueprint(bp)
    docs = get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "Afterward"})
    app.register_blueprint(docs, url_prefix="/docs")
