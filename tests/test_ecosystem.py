"""Metrics under gunicorn with real workers, the client library and the `afterward` command line."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests
from afterward_client import AfterwardError, Client
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT, WebService, start_workers, wait_until

pytestmark = pytest.mark.integration


def families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def total(family, **labels) -> float:
    return sum(s.value for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_scrape_cleanly_across_processes(web, workers, real_redis):
    workers(count=1)
    ids = [web.post_job("log", {"message": f"m{i}"}).json()["id"] for i in range(6)]
    failing = web.post_job("flaky", {"failures": 3, "retries": 1}).json()["id"]
    for job_id in ids:
        web.wait_for_status(job_id, {"finished"})
    web.wait_for_status(failing, {"failed"})
    for _ in range(10):  # spread over both gunicorn processes
        requests.get(web.url("/healthz"), timeout=10)
    scraped = families(requests.get(web.url("/metrics"), timeout=30).text)
    assert total(scraped["afterward_jobs_accepted"], type="log") == 6
    assert total(scraped["afterward_jobs_finished"], type="log") == 6
    assert total(scraped["afterward_jobs_retried"], type="flaky") == 1
    assert total(scraped["afterward_jobs_failed"], type="flaky") == 1
    durations = [s for s in scraped["afterward_job_duration_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in durations if s.labels["type"] == "log") == 6
    assert total(scraped["afterward_workers_alive"]) >= 1
    # HTTP figures from every gunicorn process, summed.
    assert total(scraped["afterward_http_requests"], route="/healthz", status="200") >= 10


def cli(*args: str, url: str, key: str | None = None) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "afterward_client.cli",
        "--url",
        url,
        *(["--api-key", key] if key else []),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


def test_cli_submits_follows_and_cancels(web, workers):
    workers(count=1)
    done = cli("submit", "sleep", "--seconds", "2", "--wait", url=web.base)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["status"] == "finished" and view["result"] == {"slept": 2.0}
    assert "100.0%" in done.stderr  # the progress bar reached its end
    assert "finished" in done.stderr

    status = cli("status", view["id"], url=web.base)
    assert json.loads(status.stdout)["id"] == view["id"]

    started = json.loads(cli("submit", "sleep", "--seconds", "600", url=web.base).stdout)
    web.wait_for_status(started["id"], {"started"})
    canceled = cli("cancel", started["id"], url=web.base)
    assert canceled.returncode == 0, canceled.stderr
    assert json.loads(canceled.stdout)["id"] == started["id"]
    # The answer may come before the worker confirms the stop; the job must end stopped.
    ended = web.wait_for_status(started["id"], {"stopped", "finished", "failed"})
    assert ended["status"] == "stopped"

    refused = cli("submit", "sleep", "--seconds", "-1", url=web.base)
    assert refused.returncode == 1
    assert "validation_failed" in refused.stderr and "seconds" in refused.stderr


def test_cli_indexes_files_and_searches(web, tmp_path, env, proc_dir):
    embedder = start_workers(env, proc_dir, count=1, kind="embedder")
    try:
        lines = tmp_path / "facts.txt"
        lines.write_text("Bees make honey from nectar.\n\nThe moon orbits the earth every month.\n")
        single = tmp_path / "volcano.txt"
        single.write_text("Lava flowed down the slopes after the eruption.")
        indexed = cli("index", "--lines", str(lines), "--wait", url=web.base)
        assert indexed.returncode == 0, indexed.stderr
        assert sorted(json.loads(indexed.stdout)["result"]["indexed"]) == ["facts.txt:1", "facts.txt:3"]
        assert cli("index", str(single), "--wait", url=web.base).returncode == 0
        found = cli("search", "insects producing something sweet", "-k", "1", url=web.base)
        assert found.returncode == 0
        assert "facts.txt:1" in found.stdout and "honey" in found.stdout
    finally:
        embedder.kill()


def test_client_honours_retry_after_and_is_safe_to_retry(session_env, proc_dir, workers):
    keyed = WebService(dict(session_env, API_KEYS="client-key", RATE_LIMIT="3 per 2 seconds"), proc_dir)
    try:
        client = Client(keyed.base, api_key="client-key")
        started = time.monotonic()
        views = [client.submit("log", {"message": f"burst {i}"}) for i in range(7)]
        assert len({v["id"] for v in views}) == 7
        assert time.monotonic() - started >= 2  # it waited out the limit instead of failing
        # A repeated submit with the same key is the same job, as after a lost answer.
        again = client.submit("log", {"message": "burst 0"}, idempotency_key="fixed")
        assert client.submit("log", {"message": "burst 0"}, idempotency_key="fixed")["id"] == again["id"]
        with pytest.raises(AfterwardError) as refused:
            Client(keyed.base, api_key="wrong").submit("log", {"message": "x"})
        assert refused.value.status == 401
        assert client.status(views[0])["id"] == views[0]["id"]  # follows the Location it was given
    finally:
        keyed.stop()


@pytest.mark.browser
def test_docs_page_lists_every_route(web, tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS

    spec = requests.get(web.url("/openapi.json"), timeout=10).json()
    expected = sum(len(item) for item in spec["paths"].values())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(web.url("/docs/"))
        wait_until(lambda: page.locator(".opblock").count() >= expected, what="the operations")
        assert page.locator(".opblock-summary-path[data-path='/jobs/embed']").count() == 1
        page.locator("section.models").first.wait_for()
        browser.close()
