"""Every setting of the service and its workers, read from the environment in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import cache
from typing import Any

DAY = 24 * 3600

# Longest REDIS_REPLICA_TIMEOUT_MS: the web process's Redis calls time out after 5 s.
MAX_REPLICA_TIMEOUT_MS = 4000

# What runs the embedding model: torch, or ONNX Runtime on the fp32 graph exported from it.
BACKENDS = ("torch", "onnx")
# Backends once offered, and why they are not any more (said when a setting still names one).
WITHDRAWN_BACKENDS = {
    "onnx-int8": "withdrawn: its int8 graph's searches returned only 0.83 of fp32's top 10 "
    "results; onnx is as exact as torch, and faster",
}


@dataclass(frozen=True)
class Settings:
    """Configuration shared by the web process and the workers."""

    # Hosted Redis add-ons set REDIS_URL; the name is fixed. redis+sentinel://host:port[,…]/service
    # (rediss+sentinel:// for TLS) reaches the primary through Sentinel and follows a failover.
    redis_url: str = "redis://localhost:6379/0"
    # 0 accepts a rediss:// server whose certificate cannot be verified (managed Redis with a
    # self-signed certificate). Off by default: it gives up protection against impostors.
    redis_tls_verify: int = 1
    # Replicas that must confirm (Redis WAIT) every write the API acknowledges before it answers,
    # so that a failover promoting one of them keeps the write; 0: answer once the primary has it.
    # Unconfirmed in REDIS_REPLICA_TIMEOUT_MS, the answer is 503 `not_replicated` (README).
    redis_min_replicas: int = 0
    # How long a request waits for those replicas, in ms: below the web client's 5 s socket
    # timeout (MAX_REPLICA_TIMEOUT_MS), and never 0, which WAIT takes for "forever".
    redis_replica_timeout_ms: int = 1000
    # API keys clients send as `Authorization: Bearer <key>`, comma-separated; unset: open API.
    api_keys: tuple[str, ...] = ()
    # Those of API_KEYS that are operators' keys: only they may pause and resume queues. With no
    # API_KEYS (the open, single-tenant mode) everyone is the operator.
    admin_keys: tuple[str, ...] = ()
    # Requests one API key (or, without keys, one address) may make, in the `limits` notation.
    rate_limit: str = "6000 per minute"
    # Failed authentications (API key or dashboard password) one client address may make, in
    # the `limits` notation; past it, every attempt from there answers 429 until the window ends.
    auth_failure_limit: str = "20 per minute"
    # Basic-auth credentials of the dashboard at /rq/; unset: it answers no one (but DASHBOARD_OPEN).
    dashboard_user: str = ""
    dashboard_password: str = ""
    # 1, for local use: without credentials the dashboard answers requests made on this machine
    # to localhost (loopback client and a loopback Host), nothing else.
    dashboard_open: int = 0
    # Web process: address, processes (the Heroku convention) and threads per process.
    host: str = "0.0.0.0"
    port: int = 5000
    web_concurrency: int = 2
    web_threads: int = 16
    # File the `log` job appends to (one JSON object per line).
    log_file: str = "var/log/jobs.log"
    # How long finished and failed jobs (status, result, error) stay readable.
    result_ttl: int = DAY
    # Idempotency keys are remembered at least this long.
    idempotency_ttl: int = DAY
    # Longest `timeout` a client may ask for, in seconds.
    max_job_timeout: int = 4 * 3600
    # Longest `delay` a client may ask for, in seconds.
    max_delay: int = 7 * DAY
    # First retry waits this many seconds; each further retry waits twice as long.
    retry_backoff: int = 2
    # Longest single retry wait, in seconds.
    max_retry_backoff: int = 600
    # Request bodies larger than this are refused with 413.
    max_body_bytes: int = 1024 * 1024
    # Long-polling requests (`?wait=N`) one web process holds at once; more answer at once.
    # 0 means three quarters of WEB_THREADS, leaving threads for other requests.
    long_poll_slots: int = 0
    # A waiting request is woken by the job's end event; it also re-reads the job this often
    # (seconds), in case an event was missed while the listener reconnected.
    long_poll_recheck: int = 1
    # Embedding model: a sentence-transformers folder; empty means the bundled all-MiniLM-L6-v2.
    embed_model_path: str = ""
    embed_model_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    # What runs the model: torch or onnx (BACKENDS). onnx by default: faster than torch, and its
    # searches return what torch's return (top-10 agreement >= 0.99; `python -m bench.embed_backends`).
    embed_backend: str = "onnx"
    # Where the ONNX backends keep the graphs they export from the model folder on first use.
    embed_model_cache: str = "var/models"
    # Threads torch, ONNX Runtime, FAISS and BLAS may use in each process (2 cores: more
    # threads, less speed).
    embed_threads: int = 1
    # Texts per batch the encoder runs.
    embed_batch_size: int = 64
    # With API_KEYS set, workers take turns between keys (jobs.engine.fair): a key alone may use
    # every worker. This caps, besides, the jobs of one key running at once in each process type
    # (worker, embedder); 0: no cap. A job keeps the cap in force when it was accepted.
    key_max_active: int = 0
    # With API_KEYS set: jobs one key may have waiting (queued, rate-limited, scheduled) at
    # once, and megabytes of their request bodies; beyond either, submissions answer 429.
    key_max_waiting: int = 10_000
    key_max_waiting_mb: int = 256
    # With API_KEYS set: search cost units one key may spend a minute (0: no budget). A search
    # costs 1, plus 1 per 500 characters of query, plus 1 per 25 results asked for (k).
    search_budget: int = 600
    # Whose documents a key sees: `key`, its own (a namespace per key), or `shared`, one index
    # every key searches, in which only the key that wrote a document may change it.
    index_scope: str = "key"
    # With API_KEYS set: documents one key may store, and megabytes of their text and metadata
    # (0: no cap). A key at both caps holds about 100,000 x 2 KB (hash, vector, graph links:
    # bench.index) + 100 MB in Redis, the size of its KEY_MAX_WAITING_MB share; ten keys at
    # the cap make the million documents the search budgets are measured at.
    key_max_documents: int = 100_000
    key_max_document_mb: int = 100
    # Recurring schedules one key (or, without API_KEYS, the open API) may keep (0: no cap);
    # beyond, POST /schedules answers 429. Each tick's job also takes a place in
    # KEY_MAX_WAITING like any submission.
    key_max_schedules: int = 100
    # Embed jobs an embedder takes off its queue together, to start, encode, index and finish
    # as one batch (each keeps its own status and result).
    embed_batch_jobs: int = 32
    # Completion webhooks (a job's `callback_url`): every delivery is signed with this secret
    # (HMAC-SHA256); unset, jobs with a callback_url are refused.
    callback_secret: str = ""
    # Host names, addresses or networks (CIDR) a callback may reach although they are not
    # public (loopback, private, link-local), comma-separated; checked after DNS resolution.
    callback_allowed_hosts: tuple[str, ...] = ()
    # Seconds one delivery attempt may take to connect and to be answered.
    callback_timeout: int = 10
    # A delivery that keeps failing is retried, with back-off, this long after the job's end.
    callback_retry_for: int = 6 * 3600
    # Deliveries one worker process makes at once.
    callback_concurrency: int = 4
    # Limits on job inputs and search requests.
    max_log_chars: int = 10_000
    max_sleep_seconds: int = 3600
    max_documents: int = 256
    max_text_chars: int = 10_000
    max_metadata_bytes: int = 2048
    max_metadata_fields: int = 32
    max_query_chars: int = 2000
    max_k: int = 100
    # Where a host keeps the index snapshot's file, which its processes memory-map and share.
    index_dir: str = "var/index"
    # Up to this many documents the index is searched exactly; above, a snapshot's vectors are
    # an HNSW graph (approximate, recall@10 measured in bench.index).
    index_exact_up_to: int = 100_000
    # Candidates an HNSW search looks at: more is slower and finds more of the true top k.
    index_ef_search: int = 256
    # A search replica writes a snapshot of the index after this many changes since the last one.
    snapshot_every: int = 10_000
    # 1: web processes load the model and index replica when they start, not on the first search.
    search_warmup: int = 1
    # Extra modules whose JOB_TYPES mappings extend the built-in job types.
    extra_job_modules: tuple[str, ...] = ()
    # A running job gets this many seconds past its timeout before its process is killed.
    timeout_grace: int = 10
    # Jobs one work-horse process runs before the worker replaces it with a fresh one.
    horse_max_jobs: int = 1000
    # A work-horse whose resident memory is above this (MB) after a job is replaced; 0: no cap.
    horse_max_rss_mb: int = 1024
    # Seconds between a worker's checks on a running job (heartbeat, hard timeout).
    job_monitoring_interval: int = 5
    # Seconds between a worker's maintenance rounds (registry clean-up, job recovery).
    maintenance_interval: int = 10
    # After SIGTERM a running job gets this long to finish before it is put back in its queue
    # (Heroku sends SIGKILL 30 s after SIGTERM).
    shutdown_grace: int = 20
    # A job taken off a queue but not started after this many seconds is put back.
    intermediate_grace: int = 30

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables named after the fields in upper case."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = environ.get(field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(field.name, field.type, raw)
        return cls(**values)

    @property
    def redis_client_url(self) -> str:
        """REDIS_URL with the TLS options every client (web, workers, limiter) must use."""
        if self.redis_url.startswith(("rediss://", "rediss+sentinel://")) and not self.redis_tls_verify:
            separator = "&" if "?" in self.redis_url else "?"
            return f"{self.redis_url}{separator}ssl_cert_reqs=none&ssl_check_hostname=false"
        return self.redis_url

    @property
    def heartbeat_ttl(self) -> int:
        """Seconds a running job's heartbeat lasts: after that, maintenance calls it abandoned."""
        return 3 * self.job_monitoring_interval + 5

    @property
    def worker_retry_seconds(self) -> float:
        """How long a worker's Redis calls retry before they fail.

        Shorter than a heartbeat, so a worker cut off from Redis gives up on its job before
        maintenance elsewhere can take the job for abandoned and run it a second time.
        """
        return max(1.0, self.heartbeat_ttl - 2 * self.job_monitoring_interval)

    @property
    def waiting_slots(self) -> int:
        return self.long_poll_slots or max(1, self.web_threads * 3 // 4)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """Return a copy with the given fields replaced (used by tests and create_app)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **overrides)


def _parse(name: str, annotation: Any, raw: str) -> Any:
    if annotation in ("int", int):
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name.upper()} must be an integer, got {raw!r}") from None
        if value < 0:
            raise ValueError(f"{name.upper()} must not be negative, got {raw!r}")
        if name == "redis_replica_timeout_ms" and not 1 <= value <= MAX_REPLICA_TIMEOUT_MS:
            raise ValueError(
                f"REDIS_REPLICA_TIMEOUT_MS must be 1 to {MAX_REPLICA_TIMEOUT_MS} (ms), got {raw!r}"
            )
        return value
    if annotation in ("tuple[str, ...]",):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if name == "index_scope" and raw not in ("key", "shared"):
        raise ValueError(f"INDEX_SCOPE must be key or shared, got {raw!r}")
    if name == "embed_backend" and raw not in BACKENDS:
        why = f" ({WITHDRAWN_BACKENDS[raw]})" if raw in WITHDRAWN_BACKENDS else ""
        raise ValueError(f"EMBED_BACKEND must be one of {', '.join(BACKENDS)}, got {raw!r}{why}")
    return raw


def apply_process_environment(environ: dict | None = None) -> None:
    """Pin BLAS/OpenMP threads and keep model libraries offline, unless already set.

    Must run before numpy, torch or FAISS are imported: their thread pools read these once.
    """
    environ = os.environ if environ is None else environ
    threads = environ.get("EMBED_THREADS") or str(Settings.embed_threads)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        environ.setdefault(name, threads)
    # Nothing is ever downloaded: the model ships as a package.
    environ.setdefault("HF_HUB_OFFLINE", "1")
    environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Progress bars are for terminals; worker logs get one line per event.
    environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Workers fork per job; the tokenizer's own thread pool must not be live across a fork.
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # onnxruntime's telemetry uploads from a thread it starts as it is imported (outside CI).
    # The web process forks its workers after loading the model (gunicorn.conf.py): a child
    # inherits the thread's state but not the thread, and at exit it waits for the thread and
    # hangs, or aborts (`terminate called … std::system_error`). onnxruntime 1.32 reads the
    # first name; its source has also used the second.
    environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    environ.setdefault("ORT_TELEMETRY_DISABLED", "1")


@cache
def get_settings() -> Settings:
    """This process's settings, read from its environment once (`get_settings.cache_clear()`
    makes the next call read it again). A setting it cannot take stops the process with one
    line naming it (SystemExit prints it), not a traceback: every process reads its settings
    as it starts."""
    try:
        return Settings.from_env()
    except ValueError as error:
        raise SystemExit(f"configuration error: {error}") from None
