"""Afterward's web process: a JSON API that accepts jobs and reports on them."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from typing import Any

from flask import Flask
from redis.exceptions import RedisError

from jobs import logs
from jobs.connection import warn_if_evicting
from jobs.settings import get_settings
from service import metrics
from service.dashboard import init_dashboard
from service.errors import register_error_handlers
from service.metrics import init_metrics
from service.openapi import init_openapi
from service.requests import init_request_ids
from service.security import init_security
from service.state import init_state


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; `config` overrides settings read from the environment (tests use it)."""
    settings = get_settings()
    if config:
        settings = settings.with_overrides(config)
    logs.configure()

    app = Flask(__name__)
    # Never the interactive debugger, whatever FLASK_DEBUG says: errors are JSON, tracebacks logged.
    app.config.update(DEBUG=False, PROPAGATE_EXCEPTIONS=False)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.strict_slashes = False
    # The icon in service/static/: the dashboard's pages ask for /static/favicon.ico, browsers
    # showing any other answer (an API's JSON) for /favicon.ico.
    app.add_url_rule("/favicon.ico", "favicon", lambda: app.send_static_file("favicon.ico"))

    state = init_state(app, settings)
    with suppress(RedisError):  # Redis may not be up yet; /readyz says so then
        warn_if_evicting(state.redis)
    register_error_handlers(app)
    init_request_ids(app)
    init_security(app, state)
    init_dashboard(app, state)

    from service.views import batches, health, jobs, queues, schedules, search, webhooks

    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(search.bp)
    app.register_blueprint(queues.bp)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(schedules.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(batches.bp)
    init_metrics(app, state)
    init_openapi(app)
    if settings.search_warmup:
        state.search.start_background()
    return app
