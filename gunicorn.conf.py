"""Gunicorn settings for the web process, taken from the same environment as the app."""

import os
import shutil
import tempfile

from jobs.connection import check_redis_url
from jobs.logs import DICT_CONFIG
from jobs.settings import get_settings

_settings = get_settings()
# A malformed REDIS_URL: one line, before any worker boots (not a traceback per worker).
check_redis_url(_settings.redis_url)

# Heroku assigns PORT; `make run` sets HOST to stay on loopback.
bind = f"{_settings.host}:{_settings.port}"

# Processes: WEB_CONCURRENCY is the Heroku convention.
workers = _settings.web_concurrency

# Threads per process: a long poll (`?wait=`) holds a thread, not a process, and the app
# lets only LONG_POLL_SLOTS of them wait at once, so other requests always find a thread.
# The worker is gunicorn's gthread reading each request whole on its event loop before a
# thread takes it, so clients that send half a request, or drip it, hold no thread
# (webserver/worker.py; bench.slow_clients measures it).
worker_class = "webserver.worker.BufferingWorker"
threads = _settings.web_threads
# Open connections per process (idle, kept alive, or still sending): past it, a process
# stops accepting until one closes. Each unfinished request costs its buffered bytes only.
worker_connections = 2000

# A long poll lasts up to 60 s; the worker must not be killed for it.
timeout = 90
# Heroku sends SIGKILL 30 s after SIGTERM; finish in-flight requests before that.
graceful_timeout = 25
keepalive = 5

# Logs to stdout, where the platform collects them: gunicorn's own events and access lines
# too go out as JSON lines, like the app's (jobs.logs).
accesslog = "-"
errorlog = "-"
access_log_format = "%(m)s %(U)s %(s)s %(B)s bytes %(M)s ms request_id=%({x-request-id}o)s"
logconfig_dict = {
    **DICT_CONFIG,
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True},
        "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
    },
}

# No runtime control socket: it lives at one path per user, which several web processes on
# one machine would fight over, and the platform manages the process anyway.
control_socket_disable = True

# Prometheus counters of all web processes, summed at /metrics: each process writes its own
# files here. A fresh directory per start, so a restart does not add up stale counts.
_metrics_dir = tempfile.mkdtemp(prefix="afterward-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def when_ready(server):
    # The model, loaded once before the workers fork: its weights are pages they all share
    # (copy-on-write, and never written), not a copy per process; bench.memory measures it.
    # ONNX Runtime with one thread and its telemetry off (jobs.settings) starts no threads, so a
    # forked process may use the session and exit cleanly (tests/test_runners.py stops the stack
    # this way); with more threads, or torch, each process loads its own.
    if _settings.search_warmup and _settings.embed_backend != "torch" and _settings.embed_threads == 1:
        import gc

        from jobs.index.embedding import get_encoder

        try:
            get_encoder().encode(["warm up"])
        except Exception:
            server.log.exception("the model did not load before the fork; each process loads its own")
        gc.freeze()  # what is loaded so far is never collected: the collector does not dirty its pages


def post_worker_init(worker):
    # With SEARCH_WARMUP=1 a web process takes its first request only once its model and index
    # replica are loaded: no client ever waits for a cold search, and /readyz is true everywhere.
    if _settings.search_warmup:
        from service.state import EXTENSION

        search = worker.wsgi.extensions[EXTENSION].search
        if not search.wait_loaded(timeout=SEARCH_WARMUP_TIMEOUT):
            worker.log.warning("search still loading after %s s; serving anyway", SEARCH_WARMUP_TIMEOUT)


# Longest a web process waits for search to load before it serves anyway (/readyz says so).
SEARCH_WARMUP_TIMEOUT = 60


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    shutil.rmtree(_metrics_dir, ignore_errors=True)


# Never reload code in this process (and Flask's debugger is never enabled).
reload = False
