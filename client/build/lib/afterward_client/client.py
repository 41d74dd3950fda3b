"""The Python client. Safe to retry: every submit carries an Idempotency-Key."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

import requests

TERMINAL = frozenset({"finished", "failed", "canceled", "stopped"})
RETRYABLE = frozenset({429, 503})


class AfterwardError(Exception):
    """An error answer of the API: its status, code, message and details."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


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
        key = idempotency_key or uuid.uuid4().hex
        response = self._call("POST", f"jobs/{job_type}", json=fields, headers={"Idempotency-Key": key})
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
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.status(job, wait=poll)
            if on_update is not None:
                on_update(view)
            if view["status"] in TERMINAL:
                return view
            if deadline is not None and time.monotonic() > deadline:
                return view

    def cancel(self, job: str | dict[str, Any]) -> dict[str, Any]:
        return self._call("DELETE", f"jobs/{_id(job)}").json()

    def retry(self, job: str | dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"jobs/{_id(job)}/retry").json()

    def jobs(
        self, status: str | None = None, queue: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        params = {
            k: v for k, v in {"status": status, "queue": queue, "limit": limit}.items() if v is not None
        }
        return self._call("GET", "jobs", params=params).json()["jobs"]

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
        return self._call("GET", f"documents/{doc_id}").json()

    # ------------------------------------------------------------------ transport

    def _call(self, method: str, path: str, timeout: float = 30, **kwargs: Any) -> requests.Response:
        """One API call; waits as told by Retry-After on 429 and 503, and retries network errors."""
        url = urljoin(self.base_url, path)
        attempt = 0
        while True:
            try:
                response = self.session.request(method, url, timeout=timeout, **kwargs)
            except requests.ConnectionError:
                if attempt >= self.retries:
                    raise
                time.sleep(min(2**attempt * 0.5, self.max_backoff))
                attempt += 1
                continue
            if response.status_code in RETRYABLE and attempt < self.retries:
                time.sleep(min(_retry_after(response), self.max_backoff))
                attempt += 1
                continue
            if response.status_code >= 400:
                raise _error(response)
            return response


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
