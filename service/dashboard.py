"""rq-dashboard at /rq/, behind basic auth, closed to cross-site requests, on our JSON jobs.

rq-dashboard's blueprint has no authentication and offers destructive actions, so every
request to it passes `guard()` first. It also loads jobs with RQ's default (pickle)
classes; pointing its module-level names at ours makes it read and write JSON jobs only.
Its queue list marks a paused queue (jobs.engine.pause) with a badge by the queue's name.

Without credentials the dashboard answers no one, unless DASHBOARD_OPEN=1 opens it to
requests made on this machine to a loopback name. A loopback client alone is not enough:
a reverse proxy on the same machine is a loopback client for every visitor, and a page on a
rebound DNS name reaches 127.0.0.1 with its own name as Host (and a matching Origin).
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import re
from typing import Any

import rq_dashboard
import rq_dashboard.default_settings
import rq_dashboard.web
from flask import Flask, Response, request
from redis.exceptions import ResponseError
from rq.exceptions import NoSuchJobError
from rq.job import JobStatus, parse_job_id, validate_job_id
from rq.serializers import JSONSerializer

from jobs import keys
from jobs.engine import pause
from jobs.engine.errors import plain_message
from jobs.engine.job import Job
from jobs.engine.queue import Queue
from jobs.engine.worker import Worker
from jobs.settings import Settings
from service.errors import REDIS_RETRY_AFTER, ApiError, error_response
from service.replication import acknowledges_writes
from service.retry import NotRetryable, retry
from service.security import count_failed_authentication, refuse_blocked_client
from service.state import AppState

log = logging.getLogger(__name__)

BLUEPRINT = "rq_dashboard"
URL_PREFIX = "/rq"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REALM = 'Basic realm="Afterward dashboard", charset="UTF-8"'
# Host headers DASHBOARD_OPEN accepts: loopback names, with an optional port.
LOOPBACK_HOST = re.compile(r"(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?", re.IGNORECASE)
# Headers a proxy adds: a request carrying one was made on someone else's behalf.
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP")
# No other site may frame the dashboard (its buttons would be clicked through a decoy).
FRAME_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}


# What the dashboard's URLs may name; rq-dashboard answers 500 to anything else (see _check_arguments).
INSTANCE = 0  # one Redis, the service's own
REGISTRIES = ("queued", "started", "finished", "failed", "deferred", "scheduled", "canceled")
ORDERS = ("asc", "dsc")
MAX_PER_PAGE = 200  # the most the dashboard's own "jobs per page" field offers
MAX_PAGE = 1_000_000  # keeps the list offsets within what Redis accepts
# rq-dashboard's queues page catches a Redis outage and answers 200 with this body.
CONNECTION_ERROR_PAGE = b"<h1>Connection Error</h1>"

# The dashboard's actions: with REDIS_MIN_REPLICAS they answer once replicas have them, as the API does.
WRITE_VIEWS = ("delete_job_view", "requeue_job_view", "requeue_all", "empty_queue", "compact_queue")

# The queue list's row template (rq-dashboard 0.9's queues.html) shows the name in this cell;
# the badge of a paused queue goes beside it (tests/test_dashboard_browser.py looks for it).
QUEUE_NAME_CELL = "<td><%= d.name %></td>"
PAUSED_BADGE = (
    '<td><%= d.name %><% if (d.paused) { %> <span class="badge badge-warning" data-role="paused" '
    'title="Paused since <%- d.paused_at %>: workers take none of its jobs">paused</span><% } %></td>'
)

# Dashboard data that its pages insert as raw HTML; every string in it is escaped here.
UNESCAPED_VIEWS = frozenset({f"{BLUEPRINT}.job_info", f"{BLUEPRINT}.list_workers"})


def describe(job: Any) -> str:
    """A job's description in the dashboard, with its progress while it has one."""
    description = job.description or job.id
    if job.get_status(refresh=False) == JobStatus.STOPPED:
        # RQ keeps stopped jobs in its failed registry, which the dashboard lists as Failed.
        description = f"[stopped] {description}"
    progress = (job.meta or {}).get("progress")
    if progress:
        description += f" | {progress.get('percent', 0):g}% {progress.get('message', '')}".rstrip()
    return description


def error_summary(job: Any, exc_info: str | None) -> str | None:
    """What the dashboard shows of a failure: type and message; tracebacks stay in worker logs."""
    if not exc_info:
        return exc_info
    error = (job.meta or {}).get("error") if job is not None else None
    if error:
        summary = f"{error['type']}: {error['message']}"
    else:
        summary = plain_message(exc_info.strip().splitlines()[-1])
    return summary + "\n(The full traceback is in the worker's log.)"


_rq_serialize_job = rq_dashboard.web.serialize_job


def serialize_job(job: Any) -> dict[str, Any]:
    """A job in the dashboard's lists, with its failure summarized."""
    data = _rq_serialize_job(job)
    data["exc_info"] = error_summary(job, data["exc_info"])
    return data


_rq_serialize_queues = rq_dashboard.web.serialize_queues


def serialize_queues(instance_number: int, queues: list[Any]) -> list[dict[str, Any]]:
    """The dashboard's queue list, with whether each queue is paused (one key read per queue)."""
    data = _rq_serialize_queues(instance_number, queues)
    if not queues:
        return data
    with queues[0].connection.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.get(keys.paused(queue.name))
        stored = pipe.execute()
    for item, value in zip(data, stored, strict=True):
        state = pause.state(item["name"], value)
        item.update(paused=state["paused"], paused_at=state["paused_at"])
    return data


def requeue_job(job_id: str, connection: Any, serializer: Any = None) -> Job:
    """rq's requeue_job, with our job class (JSON, registered functions only), resetting the job
    as `POST /jobs/<id>/retry` does (its old error and progress go). Both of rq-dashboard's
    requeue routes, one job and a whole queue's failed jobs, call this module-level name."""
    job = Job.fetch(job_id, connection=connection)
    try:
        return retry(job)
    except NotRetryable:
        status = job.get_status(refresh=False)
        raise ApiError(
            409,
            f"Only failed or stopped jobs can be requeued; this one is {getattr(status, 'value', status)}.",
            code="conflict",
        ) from None


def init_dashboard(app: Flask, state: AppState) -> None:
    web = rq_dashboard.web
    web.Job, web.Queue, web.Worker, web.requeue_job = Job, Queue, Worker, requeue_job
    web.config.serializer = JSONSerializer
    web.format_job_description = describe
    web.serialize_job = serialize_job
    web.serialize_queues = serialize_queues
    # One shared client instead of a new connection per dashboard request.
    web.from_url = lambda *args, **kwargs: (None, state.redis)

    app.config.from_object(rq_dashboard.default_settings)
    app.config["RQ_DASHBOARD_REDIS_URL"] = ["redis"]  # the dashboard shows this; the URL stays private
    app.redis_conn = state.redis  # type: ignore[attr-defined]
    app.register_blueprint(rq_dashboard.blueprint, url_prefix=URL_PREFIX)

    def compact_queue(queue_name: str) -> Any:
        """rq-dashboard's compact, but an empty queue has nothing to compact (not a 500)."""
        try:
            Queue(queue_name, connection=state.redis).compact()
        except ResponseError as error:
            if "no such key" not in str(error).lower():  # RENAME of a queue no job is in
                raise
        return {"status": "OK"}, {"Cache-Control": "no-store"}

    app.view_functions[f"{BLUEPRINT}.compact_queue"] = compact_queue
    for name in WRITE_VIEWS:
        endpoint = f"{BLUEPRINT}.{name}"
        app.view_functions[endpoint] = acknowledges_writes(app.view_functions[endpoint])

    settings = state.settings
    if not _has_credentials(settings) and settings.dashboard_open:
        log.warning(
            "DASHBOARD_OPEN=1 without DASHBOARD_USER/DASHBOARD_PASSWORD: the dashboard at %s/ "
            "answers anyone on this machine. Set credentials before exposing the service.",
            URL_PREFIX,
        )

    @app.before_request
    def guard() -> None:
        if request.blueprint == BLUEPRINT:
            _authorize(settings)
            _refuse_cross_site()
            _check_arguments(state.queues)

    @app.after_request
    def refuse_framing(response: Response) -> Response:
        if _is_dashboard_path(request.path):
            for name, value in FRAME_HEADERS.items():
                response.headers[name] = value
        return response

    @app.after_request
    def escape_for_html(response: Response) -> Response:
        # Job descriptions, errors and metadata carry client text: never let it become markup.
        if request.endpoint in UNESCAPED_VIEWS and response.is_json:
            data = response.get_json()
            if data.get("exc_info"):
                job = Job.fetch(data["id"], connection=state.redis)
                data["exc_info"] = error_summary(job, data["exc_info"])
            response.set_data(json.dumps(_escaped(data)))
        return response

    @app.after_request
    def show_paused_queues(response: Response) -> Response:
        if request.endpoint == f"{BLUEPRINT}.queues_overview" and response.status_code == 200:
            page = response.get_data(as_text=True)
            if QUEUE_NAME_CELL in page:
                response.set_data(page.replace(QUEUE_NAME_CELL, PAUSED_BADGE, 1))
        return response

    @app.after_request
    def redis_down(response: Response) -> Response:
        if (
            request.endpoint == f"{BLUEPRINT}.queues_overview"
            and response.get_data() == CONNECTION_ERROR_PAGE
        ):
            return error_response(
                503,
                "The job store is unreachable; try again shortly.",
                code="redis_unavailable",
                headers={"Retry-After": str(REDIS_RETRY_AFTER)},
            )
        return response

    @app.errorhandler(NoSuchJobError)
    def no_such_job(error: NoSuchJobError) -> Any:
        return error_response(404, "No such job.")


def _has_credentials(settings: Settings) -> bool:
    return bool(settings.dashboard_user and settings.dashboard_password)


def _authorize(settings: Settings) -> None:
    if _has_credentials(settings):
        refuse_blocked_client()
        auth = request.authorization
        user = (auth.username or "") if auth else ""
        password = (auth.password or "") if auth else ""
        # Both compared in constant time, always both.
        user_ok = hmac.compare_digest(user.encode(), settings.dashboard_user.encode())
        password_ok = hmac.compare_digest(password.encode(), settings.dashboard_password.encode())
        if not (user_ok and password_ok):
            count_failed_authentication()
            raise ApiError(
                401,
                "The dashboard needs a user name and password.",
                code="unauthorized",
                headers={"WWW-Authenticate": REALM},
            )
        return
    if not settings.dashboard_open:
        raise ApiError(
            403,
            "The dashboard is closed until DASHBOARD_USER and DASHBOARD_PASSWORD are set "
            "(or, for local use only, DASHBOARD_OPEN=1).",
            code="forbidden",
        )
    if not _is_local_request():
        raise ApiError(
            403,
            "Without DASHBOARD_USER and DASHBOARD_PASSWORD the dashboard answers only requests "
            "made on this machine to localhost, 127.0.0.1 or [::1].",
            code="forbidden",
        )


def _refuse_cross_site() -> None:
    """Actions must come from the dashboard's own pages, never from another site."""
    if request.endpoint == f"{BLUEPRINT}.requeue_all" and request.method == "GET":
        # rq-dashboard also offers "requeue all" on GET, which a link or an <img> could trigger.
        raise ApiError(405, "Use POST to requeue jobs.", code="method_not_allowed", headers={"Allow": "POST"})
    if request.method in SAFE_METHODS:
        return
    fetch_site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if fetch_site is not None:
        allowed = fetch_site in ("same-origin", "none")
    elif origin is not None:
        allowed = origin.rstrip("/") == request.host_url.rstrip("/")
    else:
        allowed = True  # not a browser: nothing was sent on anyone's behalf
    if not allowed:
        raise ApiError(403, "Cross-site requests cannot change anything here.", code="cross_site_refused")


def _check_arguments(queues: dict[str, Any]) -> None:
    """404 for what the dashboard's URLs name but does not exist, before rq-dashboard sees it.

    rq-dashboard answers 500 to these: an instance other than 0, an unknown registry, a page
    or page size that is not a positive number (or is too large for Redis), a job id RQ
    refuses. Unknown queues are refused too: the dashboard would show or empty nothing.
    """
    args = request.view_args or {}
    if args.get("instance_number", INSTANCE) != INSTANCE:
        raise ApiError(404, f"No such dashboard instance; there is one, number {INSTANCE}.")
    queue = args.get("queue_name")
    if queue is not None and queue not in queues:
        raise ApiError(404, f"No such queue; the queues are {', '.join(queues)}.")
    if args.get("registry_name", REGISTRIES[0]) not in REGISTRIES:
        raise ApiError(404, f"No such registry; the registries are {', '.join(REGISTRIES)}.")
    if args.get("order", ORDERS[0]) not in ORDERS:
        raise ApiError(404, f"No such order; use {' or '.join(ORDERS)}.")
    for name, most in (("per_page", MAX_PER_PAGE), ("page", MAX_PAGE)):
        value = str(args.get(name, 1))
        if not (value.isascii() and value.isdigit() and 1 <= int(value) <= most):
            raise ApiError(404, f"No such page: {name} must be a whole number from 1 to {most}.")
    if "job_id" in args:
        try:
            validate_job_id(parse_job_id(args["job_id"]))
        except ValueError:
            raise ApiError(404, "No such job.") from None


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    return value


def _is_dashboard_path(path: str) -> bool:
    return path == URL_PREFIX or path.startswith(URL_PREFIX + "/")


def _is_local_request() -> bool:
    """Made on this machine, to a loopback name, by no proxy (DASHBOARD_OPEN's only clients)."""
    return (
        _is_loopback(request.remote_addr)
        and LOOPBACK_HOST.fullmatch(request.host) is not None
        and not any(name in request.headers for name in FORWARDING_HEADERS)
    )


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
