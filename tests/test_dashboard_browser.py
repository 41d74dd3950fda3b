"""The dashboard in a real headless Chromium: log in, look around, requeue a failed job."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.support import ROOT, WebService, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
USER, PASSWORD = "ops", "correct horse battery staple"
# What the probe on this machine found Chromium needs, run as root without a network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def dashboard(env, proc_dir) -> Iterator[WebService]:
    web = WebService(dict(env, DASHBOARD_USER=USER, DASHBOARD_PASSWORD=PASSWORD, SEARCH_WARMUP="0"), proc_dir)
    yield web
    web.stop()


def refused(context, url: str) -> bool:
    from playwright.sync_api import Error

    try:
        return context.new_page().goto(url).status == 401
    except Error as error:  # Chromium gives up on credentials that fail (or are missing)
        return "ERR_INVALID_AUTH_CREDENTIALS" in str(error)


def test_the_dashboard_asks_for_credentials(browser, dashboard):
    for credentials in (
        None,
        {"username": USER, "password": "wrong"},
        {"username": "admin", "password": PASSWORD},
    ):
        context = browser.new_context(http_credentials=credentials)
        assert refused(context, dashboard.url("/rq/"))
        context.close()
    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD})
    assert not refused(context, dashboard.url("/rq/"))
    context.close()


def test_an_operator_requeues_a_failed_job_and_sees_it_run(browser, dashboard, workers):
    ARTIFACTS.mkdir(exist_ok=True)
    pool = workers(count=2)
    failed = dashboard.post_job("flaky", {"failures": 1}).json()
    dashboard.wait_for_status(failed["id"], {"failed"})
    for i in range(3):
        dashboard.post_job("log", {"message": f"hello {i}"})
    hostile = dashboard.post_job("log", {"message": '<img src=x onerror="window.__owned=1">'}).json()
    dashboard.wait_for_status(hostile["id"], {"finished"})

    context = browser.new_context(
        http_credentials={"username": USER, "password": PASSWORD}, viewport={"width": 1280, "height": 900}
    )
    page = context.new_page()

    # Queues with their counts.
    assert page.goto(dashboard.url("/rq/")).status == 200
    row = page.locator("table tr", has_text="default").first
    row.wait_for()
    failed_link = row.locator("td.failed a").first
    page.wait_for_function("el => el.textContent.trim() === '1'", arg=failed_link.element_handle())
    page.screenshot(path=str(ARTIFACTS / "dashboard-queues.png"), full_page=True)

    # The workers, both of them.
    page.goto(dashboard.url("/rq/0/view/workers"))
    page.wait_for_function("document.querySelectorAll('#workers tbody tr').length >= 2")
    assert "default" in page.locator("#workers").inner_text()
    page.screenshot(path=str(ARTIFACTS / "dashboard-workers.png"), full_page=True)

    # The failed job, from the failed list.
    page.goto(dashboard.url("/rq/"))
    page.locator("table tr", has_text="default").first.locator("td.failed a").first.click()
    page.locator(f"a:has-text('{failed['id']}')").click()
    page.wait_for_selector("text=planned failure on attempt 1")
    page.screenshot(path=str(ARTIFACTS / "dashboard-failed-job.png"), full_page=True)
    assert page.locator("#job-data").inner_text().count("failed") >= 1

    # Requeue it; the worker runs it again and this time it succeeds.
    page.locator("#requeue-job-btn").click()
    done = dashboard.wait_for_status(failed["id"], {"finished"})
    assert done["attempts"] == 2
    page.reload()
    page.wait_for_selector("#job-data >> text=finished")
    page.screenshot(path=str(ARTIFACTS / "dashboard-requeued-job.png"), full_page=True)

    # A running job's progress shows in its detail, and moves.
    running = dashboard.post_job("sleep", {"seconds": 20}).json()
    dashboard.wait_for_status(running["id"], {"started"})
    page.goto(dashboard.url(f"/rq/0/view/job/{running['id']}"))
    page.wait_for_selector("#job-data >> text=/\\d+% \\d+\\.\\d of 20 s/")
    first = page.locator("#job-data .description-scroll").inner_text()
    page.wait_for_function(
        "text => document.querySelector('#job-data .description-scroll').innerText !== text", arg=first
    )
    page.screenshot(path=str(ARTIFACTS / "dashboard-progress.png"), full_page=True)
    dashboard.http.delete(dashboard.url(f"/jobs/{running['id']}"))

    # Client text shown in the dashboard stays text.
    page.goto(dashboard.url(f"/rq/0/view/job/{hostile['id']}"))
    page.wait_for_selector("#job-data >> text=onerror")
    page.goto(dashboard.url("/rq/0/view/jobs/default/finished/8/asc/1"))
    page.wait_for_selector("text=onerror")
    assert page.evaluate("window.__owned") is None
    context.close()
    assert pool.alive()


def test_a_cross_site_page_cannot_requeue(browser, dashboard, workers, real_redis):
    # A page on another origin posts to the dashboard with the operator's credentials.
    workers(count=1)
    failed = dashboard.post_job("flaky", {"failures": 1}).json()
    dashboard.wait_for_status(failed["id"], {"failed"})
    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD})
    page = context.new_page()
    page.goto("data:text/html,<p>elsewhere</p>")
    status = page.evaluate(
        """async url => {
            try { const r = await fetch(url, {method: 'POST', mode: 'no-cors', credentials: 'include'});
                  return r.type; } catch (e) { return 'error'; }
        }""",
        dashboard.url(f"/rq/job/{failed['id']}/requeue"),
    )
    assert status in ("opaque", "error")
    context.close()
    wait_until(
        lambda: real_redis.hget(f"rq:job:{failed['id']}", "status") == b"failed", timeout=5, what="state"
    )
    assert requests.get(dashboard.url(f"/jobs/{failed['id']}"), timeout=10).json()["status"] == "failed"
    assert real_redis.llen("rq:queue:default") == 0


def test_a_paused_queue_is_marked_in_the_queue_list(browser, dashboard):
    ARTIFACTS.mkdir(exist_ok=True)
    for queue in ("default", "low"):  # no worker: they stay queued, and RQ lists their queues
        assert dashboard.post_job("log", {"message": "waiting", "queue": queue}).status_code == 202
    assert dashboard.http.post(dashboard.url("/queues/low/pause"), timeout=30).status_code == 200

    context = browser.new_context(
        http_credentials={"username": USER, "password": PASSWORD}, viewport={"width": 1280, "height": 600}
    )
    page = context.new_page()
    assert page.goto(dashboard.url("/rq/")).status == 200
    low = page.locator("#queues tr[data-role=queue]", has_text="low")
    badge = low.locator("[data-role=paused]")
    badge.wait_for()
    assert badge.inner_text() == "paused" and badge.is_visible()
    assert (
        page.locator("#queues tr[data-role=queue]", has_text="default").locator("[data-role=paused]").count()
        == 0
    )
    page.screenshot(path=str(ARTIFACTS / "dashboard-paused-queue.png"), full_page=True)

    # Resumed, the badge goes at the page's next refresh.
    assert dashboard.http.post(dashboard.url("/queues/low/resume"), timeout=30).status_code == 200
    badge.wait_for(state="detached")
    assert low.locator("td").first.inner_text().strip() == "low"
    context.close()


def test_the_dashboard_page_finds_its_icon_and_no_404(browser, dashboard):
    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD})
    page = context.new_page()
    failures: list[str] = []
    page.on("response", lambda response: response.status >= 400 and failures.append(response.url))
    page.on("console", lambda message: message.type == "error" and failures.append(message.text))
    assert page.goto(dashboard.url("/rq/")).status == 200
    page.wait_for_load_state("networkidle")
    # What the browser fetches for the tab's icon: the page's <link rel="shortcut icon">.
    icon = page.evaluate(
        """async () => {
            const link = document.querySelector('link[rel~="icon"]');
            const answer = await fetch(link.href);
            return {href: link.href, status: answer.status, type: answer.headers.get('content-type'),
                    size: (await answer.arrayBuffer()).byteLength};
        }"""
    )
    context.close()
    assert icon["href"] == dashboard.url("/static/favicon.ico")
    assert icon["status"] == 200 and icon["type"].startswith("image/") and icon["size"] > 0, icon
    assert failures == []
