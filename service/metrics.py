"""`/metrics` for Prometheus: HTTP figures from the web processes, job figures from Redis.

HTTP request counts and latencies are kept by prometheus-client in each web process and
summed over gunicorn's processes (PROMETHEUS_MULTIPROC_DIR, set in gunicorn.conf.py). Job
counts and histograms, queue depths, live workers and the index size are read from Redis
when Prometheus scrapes, so they cover every worker on every machine.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from jobs import keys
from jobs.families import PRIORITIES, queue_name
from jobs.index.store import DocumentStore
from jobs.metrics import BUCKETS, SEPARATOR
from service.state import AppState
from service.workers import live_workers

bp = Blueprint("metrics", __name__)
EXTENSION = "afterward-metrics"

# Label values for requests outside what the app serves. Anyone can send any method to any
# path; each new label value would be a new series for as long as the process lives, so
# everything unknown shares one value.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
UNMATCHED_ROUTE = "unmatched"

HTTP_REQUESTS = Counter(
    "afterward_http_requests",
    "HTTP requests answered, by route, method and status.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "afterward_http_request_duration_seconds",
    "Time to answer an HTTP request, by route.",
    ["route", "method"],
)
JOB_EVENTS = {
    "accepted": "Jobs accepted (answered 202).",
    "finished": "Jobs that finished.",
    "failed": "Jobs that failed for good (no retries left).",
    "retried": "Failed attempts that will be retried.",
    "stopped": "Jobs stopped on request.",
}
HISTOGRAMS = {
    "duration": ("afterward_job_duration_seconds", "How long job attempts ran, by type and queue."),
    "wait": (
        "afterward_job_wait_seconds",
        "How long jobs waited in their queue before an attempt, by type and queue.",
    ),
}


class RedisCollector(Collector):
    """Figures every process shares, read from Redis at scrape time."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def queue_label(self, job_type: str, queue: str) -> str:
        """The RQ queue's name. Figures recorded by an older version carry the priority the
        client chose instead (`default` for an embed job on `embed-default`): counted with it."""
        known = self.state.job_types.get(job_type)
        if known is not None and known.family and queue in PRIORITIES:
            return queue_name(known.family, queue)
        return queue

    def collect(self) -> Iterator:
        redis = self.state.redis
        counters = redis.hgetall(keys.METRICS_COUNTERS)
        families = {
            event: CounterMetricFamily(f"afterward_jobs_{event}", help_text, labels=["type", "queue"])
            for event, help_text in JOB_EVENTS.items()
        }
        totals: dict[tuple[str, str, str], int] = defaultdict(int)
        for field, value in counters.items():
            event, job_type, queue = field.decode().split(SEPARATOR)
            if event in families:
                totals[(event, job_type, self.queue_label(job_type, queue))] += int(value)
        for (event, job_type, queue), total in totals.items():
            families[event].add_metric([job_type, queue], total)
        yield from families.values()

        for name, (metric, help_text) in HISTOGRAMS.items():
            fields = redis.hgetall(keys.metrics_histogram(name))
            yield _histogram(metric, help_text, fields, self.queue_label)

        depth = GaugeMetricFamily("afterward_queue_depth", "Jobs waiting in each RQ queue.", labels=["queue"])
        with redis.pipeline(transaction=False) as pipe:
            for queue in self.state.queues.values():
                pipe.llen(queue.key)
                pipe.get(keys.fair_waiting_count(queue.name))  # waiting their key's turn
            answers = pipe.execute()
        for index, name in enumerate(self.state.queues):
            on_queue, behind = answers[2 * index], answers[2 * index + 1]
            depth.add_metric([name], on_queue + max(0, int(behind or 0)))
        yield depth
        yield GaugeMetricFamily(
            "afterward_workers_alive", "Workers that heartbeated lately.", value=len(live_workers(redis))
        )
        stats = DocumentStore(redis).stats()
        yield GaugeMetricFamily(
            "afterward_index_documents", "Documents in the search index.", value=stats["documents"]
        )
        yield GaugeMetricFamily(
            "afterward_index_version", "Changes applied to the search index.", value=stats["version"]
        )
        snapshot = stats["snapshot"] or {}
        yield GaugeMetricFamily(
            "afterward_index_changes_since_snapshot",
            "Changes not in the latest index snapshot yet (replicas replay them from the stream).",
            value=stats["version"] - snapshot.get("version", 0),
        )
        yield GaugeMetricFamily(
            "afterward_index_approximate",
            "1 when the latest index snapshot is an HNSW graph (approximate search), else 0.",
            value=int(snapshot.get("search") == "approximate"),
        )


def _histogram(
    metric: str, help_text: str, fields: dict[bytes, bytes], queue_label: Callable[[str, str], str]
) -> HistogramMetricFamily:
    buckets: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * (len(BUCKETS) + 1))
    sums: dict[tuple[str, str], float] = defaultdict(float)
    for field, value in fields.items():
        job_type, queue, slot = field.decode().split(SEPARATOR)
        labels = (job_type, queue_label(job_type, queue))
        if slot == "sum":
            sums[labels] += float(value)
        else:
            buckets[labels][int(slot)] += float(value)
    family = HistogramMetricFamily(metric, help_text, labels=["type", "queue"])
    for labels, counts in buckets.items():
        cumulative, total = [], 0.0
        for bound, value in zip([*map(str, BUCKETS), "+Inf"], counts, strict=True):
            total += value
            cumulative.append((bound, total))
        family.add_metric(list(labels), cumulative, sums[labels])
    return family


def init_metrics(app: Flask, state: AppState) -> None:
    collector = RedisCollector(state)

    @app.before_request
    def start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def record(response: Response) -> Response:
        route, method = request_labels()
        if "started" in g:
            HTTP_LATENCY.labels(route, method).observe(time.perf_counter() - g.started)
        HTTP_REQUESTS.labels(route, method, str(response.status_code)).inc()
        return response

    app.extensions[EXTENSION] = collector


def request_labels() -> tuple[str, str]:
    """The route and method labels of this request, from a fixed set whatever the client sent.

    A request no route answers (an unknown path, or a method the route does not take) has no
    url_rule: its path never becomes a label.
    """
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    method = request.method if request.method in KNOWN_METHODS else OTHER_METHOD
    return route, method


@bp.get("/metrics")
def metrics() -> Response:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # every gunicorn process's HTTP figures, summed
    else:
        registry.register(HTTP_REQUESTS)
        registry.register(HTTP_LATENCY)
    registry.register(current_app.extensions[EXTENSION])
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
