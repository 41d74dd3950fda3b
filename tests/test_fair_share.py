"""A fair share per API key: no key can hold every worker (KEY_MAX_ACTIVE, RQ's RateLimit)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.support import WebService, start_workers, wait_until
from tests.test_security import KEY_A, KEY_B, make_app

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def post(client, headers: dict, body: dict, type_name: str = "sleep") -> str:
    response = client.post(f"/jobs/{type_name}", json=body, headers=headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def status(client, headers: dict, job_id: str) -> str:
    return client.get(f"/jobs/{job_id}", headers=headers).get_json()["status"]


def test_a_keys_jobs_beyond_its_share_wait_rate_limited(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off", key_max_active=2).test_client()
    ids = [post(client, A, {"seconds": 60}) for _ in range(4)]
    assert [status(client, A, job_id) for job_id in ids] == [
        "queued",
        "queued",
        "rate_limited",
        "rate_limited",
    ]
    assert fake_redis.llen("rq:queue:default") == 2
    # Another key has a share of its own, and a share is per process type.
    assert status(client, B, post(client, B, {"seconds": 60})) == "queued"
    embed = post(client, A, {"text": "a document"}, type_name="embed")
    assert status(client, A, embed) == "queued"
    # A waiting job can be canceled like a queued one.
    assert client.delete(f"/jobs/{ids[3]}", headers=A).get_json()["status"] == "canceled"


def test_without_api_keys_there_is_one_tenant_and_no_cap(fake_redis, tmp_path):
    client = make_app(tmp_path, rate_limit="off", key_max_active=1).test_client()
    ids = [post(client, {}, {"seconds": 60}) for _ in range(3)]
    assert [status(client, {}, job_id) for job_id in ids] == ["queued"] * 3


@pytest.fixture
def keyed_web(env, proc_dir) -> Iterator[WebService]:
    web = WebService(dict(env, API_KEYS=f"{KEY_A},{KEY_B}"), proc_dir)
    yield web
    web.kill()


def test_one_key_filling_the_queues_cannot_hold_every_worker(keyed_web, env, proc_dir, real_redis):
    pool = start_workers(env, proc_dir, count=2)
    try:
        wait_until(lambda: real_redis.scard("rq:workers") >= 2, what="two workers", process=pool)
        http = keyed_web.http
        hogs = []
        for _ in range(4):
            response = http.post(keyed_web.url("/jobs/hold"), json={"seconds": 300}, headers=A, timeout=30)
            assert response.status_code == 202, response.text
            hogs.append(response.json()["id"])

        def statuses() -> list[str]:
            return [
                http.get(keyed_web.url(f"/jobs/{i}"), headers=A, timeout=30).json()["status"] for i in hogs
            ]

        wait_until(lambda: statuses()[0] == "started", what="key A's first job to start")
        assert statuses()[1:] == ["rate_limited"] * 3  # two live workers: a key may hold one
        response = http.post(keyed_web.url("/jobs/log"), json={"message": "key B"}, headers=B, timeout=30)
        assert response.status_code == 202, response.text
        ended = http.get(
            keyed_web.url(response.headers["Location"]), params={"wait": 30}, headers=B, timeout=60
        )
        assert ended.json()["status"] == "finished", ended.text
        view = ended.json()
        # It started at once on the worker key A could not take (the bound: 2 s).
        waited = datetime.fromisoformat(view["started_at"]) - datetime.fromisoformat(view["created_at"])
        assert waited.total_seconds() < 2, view
        # Key B's jobs beyond its share wait (unless the one before has ended already), then
        # move up one by one as each ends.
        posted = [
            http.post(keyed_web.url("/jobs/log"), json={"message": f"B {i}"}, headers=B, timeout=30)
            for i in range(4)
        ]
        assert {r.json()["status"] for r in posted} <= {"queued", "rate_limited"}
        for response in posted:
            view = http.get(
                keyed_web.url(response.headers["Location"]), params={"wait": 30}, headers=B, timeout=60
            )
            assert view.json()["status"] == "finished", view.text
        # Key A's next job moves up as soon as its running one ends.
        stopped = http.delete(keyed_web.url(f"/jobs/{hogs[0]}"), headers=A, timeout=30)
        assert stopped.json()["status"] in ("stopped", "started"), stopped.text
        wait_until(lambda: statuses()[1] == "started", what="key A's second job to start")
        assert statuses()[2:] == ["rate_limited"] * 2
    finally:
        pool.kill()


def test_a_key_may_have_only_so_many_jobs_waiting(fake_redis, tmp_path):
    client = make_app(
        tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off", key_max_waiting=3, key_max_active=1
    ).test_client()
    ids = [post(client, A, {"seconds": 60, "delay": 600}) for _ in range(3)]
    refused = client.post("/jobs/sleep", json={"seconds": 60}, headers=A)
    assert refused.status_code == 429
    error = refused.get_json()["error"]
    assert error["code"] == "quota_exceeded" and error["details"]["jobs_waiting"] == 3
    # Another key is not affected; a canceled job frees its place.
    post(client, B, {"seconds": 60})
    assert client.delete(f"/jobs/{ids[0]}", headers=A).get_json()["status"] == "canceled"
    post(client, A, {"seconds": 60})
    # A repeat of an accepted request takes no second place.
    first = client.post("/jobs/sleep", json={"seconds": 1}, headers={**A, "Idempotency-Key": "same"})
    assert first.status_code == 429  # the key is full again
    client.delete(f"/jobs/{ids[1]}", headers=A)
    for expected in (202, 200, 200):
        again = client.post("/jobs/sleep", json={"seconds": 1}, headers={**A, "Idempotency-Key": "same"})
        assert again.status_code == expected, again.get_json()


def test_and_only_so_many_bytes_of_them(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="off", key_max_waiting_mb=1).test_client()
    documents = [{"text": "x" * 9000} for _ in range(40)]  # about 360 KB a request
    for _ in range(2):
        post(client, A, {"documents": documents}, type_name="embed")
    refused = client.post("/jobs/embed", json={"documents": documents}, headers=A)
    assert refused.status_code == 429, refused.get_json()
    assert refused.get_json()["error"]["details"]["bytes_waiting"] > 700_000


def test_a_scheduled_job_that_never_runs_expires(fake_redis, tmp_path):
    client = make_app(tmp_path, rate_limit="off", max_delay=3600, result_ttl=600).test_client()
    job_id = post(client, {}, {"seconds": 1, "delay": 60})
    assert 3600 < fake_redis.ttl(f"rq:job:{job_id}") <= 3600 + 600
    queued = post(client, {}, {"seconds": 1})
    assert fake_redis.ttl(f"rq:job:{queued}") == -1  # a queued job waits for its worker


def test_a_key_spends_its_search_budget_and_no_more(fake_redis, tmp_path, monkeypatch):
    app = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off", search_budget=30)
    searched = []
    monkeypatch.setattr(
        app.extensions["afterward"].search, "search", lambda q, k, w, namespace: searched.append(k) or []
    )
    client = app.test_client()
    heavy = {"query": "x" * 10_000, "k": 100}  # costs 1 + 20 + 4
    assert client.post("/search", json=heavy, headers=A).status_code == 200
    refused = client.post("/search", json=heavy, headers=A)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "search_budget_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert client.get("/search", query_string={"q": "short"}, headers=A).status_code == 200  # 25 + 1 + 1
    assert client.get("/search", query_string={"q": "short"}, headers=B).status_code == 200
    assert searched == [100, 10, 10]
