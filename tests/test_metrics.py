"""Prometheus metrics: job figures kept in Redis, HTTP figures per process."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from jobs import keys, metrics
from jobs.engine.job import Job
from service import create_app
from service.metrics import KNOWN_METHODS
from tests.support import start_workers, wait_until
from tests.test_api import assert_error


def scrape(client, headers=None) -> dict:
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.get_data(as_text=True)
    families = text_string_to_metric_families(response.get_data(as_text=True))
    return {family.name: family for family in families}


def value(family, **labels) -> float:
    return sum(s.value for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_accepted_jobs_and_queue_depths(client, fake_redis):
    # HTTP counters live in this process for its whole life: compare before and after.
    before = value(
        scrape(client)["afterward_http_requests"], route="/jobs/<type_name>", method="POST", status="202"
    )
    for _ in range(3):
        client.post("/jobs/log", json={"message": "x", "queue": "high"})
    client.post("/jobs/sleep", json={"seconds": 1})
    families = scrape(client)
    assert value(families["afterward_jobs_accepted"], type="log", queue="high") == 3
    assert value(families["afterward_jobs_accepted"], type="sleep", queue="default") == 1
    assert value(families["afterward_queue_depth"], queue="high") == 3
    assert value(families["afterward_queue_depth"], queue="default") == 1
    assert value(families["afterward_workers_alive"]) == 0
    assert value(families["afterward_index_documents"]) == 0
    requests = families["afterward_http_requests"]
    assert value(requests, route="/jobs/<type_name>", method="POST", status="202") == before + 4


def test_ended_jobs_feed_counters_and_histograms(client, fake_redis):
    job = Job.fetch(client.post("/jobs/log", json={"message": "x"}).get_json()["id"], connection=fake_redis)
    start = datetime.now(UTC)
    job.enqueued_at, job.started_at, job.ended_at = (
        start - timedelta(seconds=2),
        start,
        start + timedelta(seconds=0.3),
    )
    with fake_redis.pipeline() as pipe:
        metrics.record_end(pipe, job, "finished")
        metrics.record_end(pipe, job, "failed")
        pipe.execute()
    families = scrape(client)
    assert value(families["afterward_jobs_finished"], type="log", queue="default") == 1
    assert value(families["afterward_jobs_failed"], type="log", queue="default") == 1
    duration = families["afterward_job_duration_seconds"]
    buckets = {s.labels["le"]: s.value for s in duration.samples if s.name.endswith("_bucket")}
    assert buckets["0.25"] == 0 and buckets["0.5"] == 2 and buckets["+Inf"] == 2
    assert value(duration, type="log") > 0
    wait = families["afterward_job_wait_seconds"]
    assert {s.labels["le"]: s.value for s in wait.samples if s.name.endswith("_bucket")}["2.5"] == 2


def test_figures_recorded_under_an_embed_jobs_priority_count_under_its_queue(client, fake_redis):
    # Before metrics named the RQ queue, an embed job on embed-default was counted as `default`.
    fake_redis.hset(keys.METRICS_COUNTERS, mapping={"finished|embed|default": 2, "finished|log|default": 5})
    fake_redis.hset(
        keys.metrics_histogram("duration"), mapping={"embed|default|3": 2, "embed|default|sum": 0.1}
    )
    job = Job.fetch(client.post("/jobs/embed", json={"text": "x"}).get_json()["id"], connection=fake_redis)
    start = datetime.now(UTC)
    job.enqueued_at, job.started_at, job.ended_at = start, start, start + timedelta(seconds=0.02)
    with fake_redis.pipeline() as pipe:
        metrics.record_end(pipe, job, "finished")
        pipe.execute()
    families = scrape(client)
    finished = {
        (s.labels["type"], s.labels["queue"]): s.value for s in families["afterward_jobs_finished"].samples
    }
    assert finished == {("embed", "embed-default"): 3, ("log", "default"): 5}
    counts = [s for s in families["afterward_job_duration_seconds"].samples if s.name.endswith("_count")]
    assert [(s.labels["type"], s.labels["queue"], s.value) for s in counts] == [("embed", "embed-default", 3)]


def test_metrics_need_a_key_when_the_api_does(fake_redis, tmp_path):
    client = create_app(
        {"api_keys": ("k",), "search_warmup": 0, "log_file": str(tmp_path / "l")}
    ).test_client()
    assert_error(client.get("/metrics"), 401, "unauthorized")
    assert "afterward_queue_depth" in scrape(client, {"Authorization": "Bearer k"})


def series(client) -> int:
    return sum(len(family.samples) for family in scrape(client).values())


def test_invented_methods_and_paths_add_no_series(client):
    # `XQZW / HTTP/1.1` needs no key; each new label value would be a series for good.
    def junk(n: int) -> None:
        for path in ("/", "/jobs", f"/no/such/path/{n}", f"/jobs/{n}/nope"):
            client.open(path, method=f"XQZW{n}")
            client.get(f"/made-up-{n}")
            client.open(f"/made-up-{n}", method="PROPFIND")

    junk(0)  # the first ones may create the shared "other"/"unmatched" series
    before = series(client)
    for n in range(1, 20):
        junk(n)
    assert series(client) == before
    samples = [s for s in scrape(client)["afterward_http_requests"].samples if s.name.endswith("_total")]
    assert {s.labels["method"] for s in samples} <= KNOWN_METHODS | {"other"}
    assert not any("made-up" in s.labels["route"] or "no/such" in s.labels["route"] for s in samples)
    invented = [s for s in samples if s.labels["route"] == "unmatched" and s.labels["method"] == "other"]
    assert sum(s.value for s in invented) >= 19 * 4


@pytest.mark.integration
def test_an_embed_job_is_counted_under_the_queue_it_is_on(web, env, proc_dir, real_redis):
    # One name per queue everywhere: the job view, /queues, the depth gauge and the job series.
    embedder = start_workers(env, proc_dir, count=1, kind="embedder")
    try:
        wait_until(lambda: real_redis.scard("rq:workers") >= 1, what="the embed worker", process=embedder)
        accepted = web.post_job("embed", {"text": "counted where it ran", "queue": "default"})
        assert accepted.status_code == 202, accepted.text
        view = web.wait_for_status(accepted.json()["id"], {"finished", "failed"})
        assert view["status"] == "finished", view
    finally:
        embedder.kill()
    assert view["queue"] == "embed-default"
    queues = {queue["name"] for queue in requests.get(web.url("/queues"), timeout=30).json()["queues"]}
    assert "embed-default" in queues

    answer = requests.get(web.url("/metrics"), timeout=30)
    assert answer.status_code == 200, answer.text
    families = {family.name: family for family in text_string_to_metric_families(answer.text)}
    assert {s.labels["queue"] for s in families["afterward_queue_depth"].samples} == queues
    for name in ("afterward_jobs_accepted", "afterward_jobs_finished"):
        embed = [s for s in families[name].samples if s.labels["type"] == "embed"]
        assert [s.labels["queue"] for s in embed if s.value] == ["embed-default"], (name, embed)
    for name in ("afterward_job_duration_seconds", "afterward_job_wait_seconds"):
        embed = [
            s for s in families[name].samples if s.labels["type"] == "embed" and s.name.endswith("_count")
        ]
        assert [(s.labels["queue"], s.value) for s in embed] == [("embed-default", 1)], (name, embed)
    job_series = [
        sample
        for family in families.values()
        if family.name.startswith(("afterward_jobs_", "afterward_job_"))
        for sample in family.samples
    ]
    assert job_series and {sample.labels["queue"] for sample in job_series} <= queues
