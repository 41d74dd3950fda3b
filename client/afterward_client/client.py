"""The Python client. Safe to retry: every submit carries an Idempotency-Key."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urljoin

import requests
from urllib3.exceptions import NameResolutionError, NewConnectionError

TERMINAL = frozenset({"finished", "failed", "canceled", "stopped"})
RETRYABLE = frozenset({429, 503})
# `POST /jobs/<name>` routes that are no job type: `retry` runs failed jobs again, in bulk.
NOT_JOB_TYPES = frozenset({"retry"})
# Seconds to wait for a connection to open; a server that takes longer is as good as down.
CONNECT_TIMEOUT = 5.0


class AfterwardError(Exception):
    """An error answer of the API: its status, code, message and details."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


class Unreachable(Exception):
    """No connection could be opened to the service (refused, unknown host, timed out)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url, self.reason = url, reason


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:5000",
        api_key: str | None = None,
        retries: int = 5,
        max_backoff: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.retries = retries
        self.max_backoff = max_backoff
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    # ------------------------------------------------------------------ jobs

    def submit(
        self, job_type: str, fields: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit a job; the answer is the job view. Retries (429, 503, network) are safe."""
        if job_type in NOT_JOB_TYPES:
            raise ValueError(f"{job_type!r} is not a job type: POST /jobs/{job_type} is another route")
        key = idempotency_key or uuid.uuid4().hex
        path = f"jobs/{quote(job_type, safe='')}"
        response = self._call("POST", path, json=fields, headers={"Idempotency-Key": key})
        view = response.json()
        view["_location"] = response.headers.get("Location", f"/jobs/{view['id']}")
        return view

    def status(self, job: str | dict[str, Any], wait: float = 0) -> dict[str, Any]:
        """A job's view, from its id or from a view returned earlier (following its Location)."""
        path = job["_location"] if isinstance(job, dict) and "_location" in job else f"/jobs/{_id(job)}"
        params = {"wait": wait} if wait else None
        return self._call("GET", path.lstrip("/"), params=params, timeout=wait + 30).json()

    def wait(
        self,
        job: str | dict[str, Any],
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        poll: float = 1.0,
    ) -> dict[str, Any]:
        """Long-poll until the job ends; `on_update` sees each view on the way (for progress)."""
        return _follow(
            lambda: self.status(job, wait=poll), lambda view: view["status"] in TERMINAL, timeout, on_update
        )

    def cancel(self, job: str | dict[str, Any]) -> dict[str, Any]:
        return self._call("DELETE", f"jobs/{_id(job)}").json()

    def retry(self, job: str | dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"jobs/{_id(job)}/retry").json()

    def jobs(
        self,
        status: str | None = None,
        queue: str | None = None,
        limit: int = 50,
        job_type: str | None = None,
        schedule: str | None = None,
    ) -> list[dict[str, Any]]:
        """Recent jobs, newest first, optionally only those in a status, queue, of a type or made
        by a schedule."""
        params = {"status": status, "queue": queue, "type": job_type, "limit": limit, "schedule": schedule}
        return self._call("GET", "jobs", params=_given(params)).json()["jobs"]

    def retry_failed(
        self,
        status: str = "failed",
        job_type: str | None = None,
        queue: str | None = None,
        since: str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """Run this key's failed (or stopped) jobs again: {"retried", "job_ids", "more"}."""
        body = {"status": status, "type": job_type, "queue": queue, "since": since, "limit": limit}
        return self._call("POST", "jobs/retry", json=_given(body)).json()

    def queues(self) -> list[dict[str, Any]]:
        """Every queue with its jobs by state, its oldest queued job's age and its workers."""
        return self._call("GET", "queues").json()["queues"]

    def pause_queue(self, name: str) -> dict[str, Any]:
        """Workers take no further job off queue `name` (an operator's key only): its state."""
        return self._call("POST", f"queues/{quote(name, safe='')}/pause").json()

    def resume_queue(self, name: str) -> dict[str, Any]:
        """Workers take queue `name`'s jobs again (an operator's key only): its state."""
        return self._call("POST", f"queues/{quote(name, safe='')}/resume").json()

    def webhook_secret(self) -> dict[str, Any]:
        """The secret this key's completion webhooks are signed with: {"owner", "secret"}."""
        return self._call("GET", "webhooks/secret").json()

    def openapi(self) -> dict[str, Any]:
        """The service's OpenAPI description (job types and their fields included)."""
        return self._call("GET", "openapi.json").json()

    # ------------------------------------------------------------------ schedules

    def create_schedule(
        self,
        job_type: str,
        fields: dict[str, Any],
        cron: str | None = None,
        every: int | None = None,
        timezone: str | None = None,
        paused: bool = False,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Submit a `job_type` job with `fields` at every tick of `cron` (in `timezone`) or every
        `every` seconds. Not retried: a repeat would make a second schedule."""
        body = {"type": job_type, "job": fields, "cron": cron, "every": every, "timezone": timezone}
        body.update(name=name, paused=paused or None)
        return self._call("POST", "schedules", json=_given(body), retries=0).json()

    def schedules(self) -> list[dict[str, Any]]:
        """The key's schedules, oldest first."""
        return self._call("GET", "schedules").json()["schedules"]

    def schedule(self, schedule_id: str) -> dict[str, Any]:
        return self._call("GET", f"schedules/{quote(schedule_id, safe='')}").json()

    def pause_schedule(self, schedule_id: str) -> dict[str, Any]:
        return self._call("POST", f"schedules/{quote(schedule_id, safe='')}/pause").json()

    def resume_schedule(self, schedule_id: str) -> dict[str, Any]:
        """Tick again, from the first tick after now (the paused time is not caught up)."""
        return self._call("POST", f"schedules/{quote(schedule_id, safe='')}/resume").json()

    def delete_schedule(self, schedule_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"schedules/{quote(schedule_id, safe='')}").json()

    # ------------------------------------------------------------------ batches

    def submit_batch(
        self, jobs: list[dict[str, Any]], callback_url: str | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit up to 1,000 jobs (`{"type": ..., fields...}` each), all or none: {"id", "total",
        "job_ids", ...}. Retries are safe (an Idempotency-Key goes with every submission)."""
        body: dict[str, Any] = {"jobs": jobs}
        if callback_url is not None:
            body["callback_url"] = callback_url
        key = idempotency_key or uuid.uuid4().hex
        return self._call("POST", "batches", json=body, headers={"Idempotency-Key": key}, timeout=60).json()

    def batch(self, batch: str | dict[str, Any], wait: float = 0) -> dict[str, Any]:
        """A batch's view: its jobs counted by status, `done` once every one has ended."""
        params = {"wait": wait} if wait else None
        return self._call("GET", f"batches/{_id(batch)}", params=params, timeout=wait + 30).json()

    def wait_batch(
        self,
        batch: str | dict[str, Any],
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        poll: float = 1.0,
    ) -> dict[str, Any]:
        """Long-poll until every job of the batch has ended; `on_update` sees each view on the way."""
        return _follow(lambda: self.batch(batch, wait=poll), lambda view: view["done"], timeout, on_update)

    # ------------------------------------------------------------------ index and search

    def index(self, documents: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        """Submit an embed job for these documents ({"text", "id"?, "metadata"?} each)."""
        return self.submit("embed", {"documents": documents, **options})

    def search(self, query: str, k: int = 10, where: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"query": query, "k": k}
        if where:
            body["filter"] = where
        return self._call("POST", "search", json=body).json()["results"]

    def document(self, doc_id: str) -> dict[str, Any]:
        return self._call("GET", f"documents/{quote(doc_id, safe='')}").json()

    def delete_document(self, doc_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"documents/{quote(doc_id, safe='')}").json()

    # ------------------------------------------------------------------ transport

    def _call(
        self, method: str, path: str, timeout: float = 30, retries: int | None = None, **kwargs: Any
    ) -> requests.Response:
        """One API call; waits as told by Retry-After on 429 and 503, and retries a connection that
        broke, up to `retries` times (default: the client's). A connection that cannot be opened
        at all fails at once (Unreachable): a refused connection answers immediately, and waiting
        would only hide a wrong URL or a server down."""
        retries = self.retries if retries is None else retries
        url = urljoin(self.base_url, path)
        attempt = 0
        while True:
            try:
                response = self.session.request(method, url, timeout=(CONNECT_TIMEOUT, timeout), **kwargs)
            except requests.ConnectionError as error:
                reason = _unreachable(error)
                if reason is not None:
                    raise Unreachable(self.base_url.rstrip("/"), reason) from None
                if attempt >= retries:
                    raise
                time.sleep(min(2**attempt * 0.5, self.max_backoff))
                attempt += 1
                continue
            if response.status_code in RETRYABLE and attempt < retries:
                time.sleep(min(_retry_after(response), self.max_backoff))
                attempt += 1
                continue
            if response.status_code >= 400:
                raise _error(response)
            return response


def _follow(
    read: Callable[[], dict[str, Any]],
    ended: Callable[[dict[str, Any]], bool],
    timeout: float | None,
    on_update: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """Long-poll with `read` until `ended` says so or `timeout` passes; the last view."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        view = read()
        if on_update is not None:
            on_update(view)
        if ended(view) or (deadline is not None and time.monotonic() > deadline):
            return view


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _unreachable(error: requests.ConnectionError) -> str | None:
    """Why no connection could be opened, or None when one was opened and then broke."""
    if isinstance(error, requests.ConnectTimeout):
        return "connection timed out"
    cause = error.args[0] if error.args else None
    reason = getattr(cause, "reason", cause)  # urllib3's MaxRetryError wraps the real error
    if isinstance(reason, NameResolutionError):
        return "unknown host"
    if not isinstance(reason, NewConnectionError):
        return None
    if isinstance(reason.__cause__, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason.__cause__, OSError) and reason.__cause__.strerror:
        return reason.__cause__.strerror.lower()
    return "no connection"


def _id(job: str | dict[str, Any]) -> str:
    return job["id"] if isinstance(job, dict) else job


def _retry_after(response: requests.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _error(response: requests.Response) -> AfterwardError:
    try:
        error = response.json()["error"]
        return AfterwardError(response.status_code, error["code"], error["message"], error.get("details"))
    except (ValueError, KeyError, TypeError):
        return AfterwardError(response.status_code, "http_error", response.text[:200])
