"""Embedding and search end to end: the real model, the Procfile's embedder and web processes.

One embedder process (two workers) serves the whole module, since loading the model takes
seconds; the tests use their own document ids and count changes, not totals.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from service.workers import live_workers
from tests.support import Process, WebService, scratch_database, start_workers, wait_until

pytestmark = pytest.mark.integration

# Unrelated documents, and for each a query that shares almost no words with it.
CORPUS = {
    "cat": "The cat curled up on the warm windowsill and slept all afternoon.",
    "bread": "Knead the dough for ten minutes, let it rise, then bake the loaf at 220 degrees.",
    "stocks": "Shares tumbled on Wall Street as investors feared rising interest rates.",
    "football": "The striker scored twice in the second half to win the championship final.",
    "volcano": "Lava poured from the crater after the eruption forced villagers to flee.",
    "python": "The interpreter raised an exception because the variable was never defined.",
    "rain": "Heavy showers and thunderstorms are expected across the region tomorrow.",
    "guitar": "She tuned the strings of her acoustic instrument before the concert.",
}
PARAPHRASES = {
    "cat": "a kitten napping in the sun",
    "bread": "how to make a homemade loaf",
    "stocks": "the equity market dropped",
    "football": "soccer match goals",
    "volcano": "molten rock and evacuation",
    "python": "a programming error in my code",
    "rain": "weather forecast with storms",
    "guitar": "musician preparing to play a show",
}


@pytest.fixture(scope="module")
def module_db(test_db):
    test_db.flush()
    yield test_db
    test_db.flush()


@pytest.fixture(scope="module")
def embedder(module_db, session_env, tmp_path_factory) -> Iterator[Process]:
    log_dir = tmp_path_factory.mktemp("embedder")
    process = start_workers(
        dict(session_env, LOG_FILE=str(log_dir / "jobs.log")), log_dir, count=2, kind="embedder"
    )
    client = module_db.client()
    wait_until(lambda: len(live_workers(client)) >= 2, what="two embed workers", process=process)
    yield process
    process.kill()


@pytest.fixture
def run(web, embedder) -> WebService:
    return web


def embed(web: WebService, body: dict, **kwargs) -> dict:
    response = web.post_job("embed", body, **kwargs)
    assert response.status_code == 202, response.text
    return web.wait_for_status(response.json()["id"], {"finished", "failed"})


def search(
    web: WebService, query: str, k: int = 10, where: dict | None = None, base: str | None = None
) -> list[dict]:
    body = {"query": query, "k": k, **({"filter": where} if where else {})}
    response = requests.post((base or web.base) + "/search", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def index_count(web: WebService) -> int:
    return requests.get(web.url("/index"), timeout=30).json()["documents"]


def tagged(prefix: str) -> dict:
    return {
        "documents": [
            {"id": f"{prefix}-{key}", "text": text, "metadata": {"run": prefix}}
            for key, text in CORPUS.items()
        ]
    }


def test_embedded_documents_are_found_by_paraphrase(run):
    prefix = uuid.uuid4().hex[:8]
    done = embed(run, tagged(prefix))
    assert done["status"] == "finished"
    assert sorted(done["result"]["indexed"]) == sorted(f"{prefix}-{key}" for key in CORPUS)
    for key, query in PARAPHRASES.items():
        results = search(run, query, k=3, where={"run": prefix})
        assert results[0]["id"] == f"{prefix}-{key}", (query, results)
        assert results[0]["text"] == CORPUS[key]
        assert results[0]["metadata"] == {"run": prefix}
        assert 0 < results[0]["score"] <= 1
        assert results[0]["score"] > results[1]["score"]  # higher is closer


def test_a_search_right_after_finished_sees_the_documents(run):
    # Read-your-writes, on both web processes (requests spread over them).
    for _ in range(4):
        doc_id = f"ryw-{uuid.uuid4().hex[:8]}"
        embed(run, {"id": doc_id, "text": "A lighthouse keeper saw ships.", "metadata": {"ryw": doc_id}})
        assert [r["id"] for r in search(run, "lighthouse in fog", k=1, where={"ryw": doc_id})] == [doc_id]


def test_get_search_and_documents_routes(run):
    doc_id = f"doc-{uuid.uuid4().hex[:8]}"
    embed(
        run,
        {
            "id": doc_id,
            "text": "Penguins huddle together to survive the Antarctic winter.",
            "metadata": {"topic": "animals"},
        },
    )
    response = requests.get(
        run.url("/search"), params={"q": "birds in the cold south pole", "k": 1}, timeout=60
    )
    assert response.status_code == 200
    assert response.json()["results"][0]["id"] == doc_id
    assert response.json()["took_ms"] >= 0
    document = requests.get(run.url(f"/documents/{doc_id}"), timeout=10).json()
    assert document["metadata"] == {"topic": "animals"}
    info = requests.get(run.url("/index"), timeout=10).json()
    assert info["dimensions"] == 384 and info["model"].endswith("all-MiniLM-L6-v2")


def test_reindexing_an_id_replaces_it(run):
    doc_id = f"up-{uuid.uuid4().hex[:8]}"
    embed(run, {"id": doc_id, "text": "The recipe needs flour, sugar and eggs.", "metadata": {"v": 1}})
    before = index_count(run)
    embed(run, {"id": doc_id, "text": "The orchestra played a symphony by Beethoven.", "metadata": {"v": 2}})
    assert index_count(run) == before
    results = search(run, "classical music performance", k=50)
    assert [r["id"] for r in results].count(doc_id) == 1
    mine = next(r for r in results if r["id"] == doc_id)
    assert mine["metadata"] == {"v": 2}
    assert "Beethoven" in mine["text"]
    assert not search(run, "anything", k=5, where={"v": 1})


def test_deleted_documents_leave_search(run):
    doc_id = f"del-{uuid.uuid4().hex[:8]}"
    embed(run, {"id": doc_id, "text": "Glaciers are melting faster every year.", "metadata": {"d": doc_id}})
    assert search(run, "ice melting", k=1, where={"d": doc_id})[0]["id"] == doc_id
    assert requests.delete(run.url(f"/documents/{doc_id}"), timeout=10).json() == {
        "id": doc_id,
        "deleted": True,
    }
    assert search(run, "ice melting", k=5, where={"d": doc_id}) == []
    assert doc_id not in [r["id"] for r in search(run, "Glaciers are melting faster every year.", k=20)]
    assert requests.get(run.url(f"/documents/{doc_id}"), timeout=10).status_code == 404


def test_two_workers_indexing_concurrently_give_exactly_200(run):
    prefix = uuid.uuid4().hex[:8]
    before = index_count(run)
    batches = [
        {
            "documents": [
                {
                    "id": f"{prefix}-{b}-{i}",
                    "text": f"Note {b}-{i}: item number {i} in batch {b}.",
                    "metadata": {"run": prefix},
                }
                for i in range(10)
            ]
        }
        for b in range(20)
    ]
    with ThreadPoolExecutor(8) as pool:
        views = list(pool.map(lambda body: embed(run, body), batches))
    assert all(view["status"] == "finished" for view in views)
    assert index_count(run) == before + 200
    ids = set()
    for b in range(20):
        ids |= {r["id"] for r in search(run, f"batch {b}", k=100, where={"run": prefix})}
    assert len(ids) == 200


def test_a_fresh_search_process_returns_the_same_results(run, session_env, tmp_path):
    prefix = uuid.uuid4().hex[:8]
    embed(run, tagged(prefix))
    expected = {q: search(run, q, k=5) for q in PARAPHRASES.values()}
    fresh = WebService(dict(session_env, WEB_CONCURRENCY="1"), tmp_path)
    try:
        for query, results in expected.items():
            again = search(run, query, k=5, base=fresh.base)
            assert [r["id"] for r in again] == [r["id"] for r in results]
            assert [r["score"] for r in again] == pytest.approx([r["score"] for r in results], abs=1e-5)
    finally:
        fresh.stop()


@pytest.mark.parametrize("pause", ["before_write", "after_write"])
def test_a_job_killed_mid_way_and_retried_indexes_each_document_once(run, module_db, pause):
    client = module_db.client()
    prefix = uuid.uuid4().hex[:8]
    before = index_count(run)
    body = {**tagged(prefix), "pause": pause, "retries": 2}
    response = run.post_job("embed_and_pause", body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    pid = wait_until(lambda: client.get(f"afterward-test:pid:{job_id}"), what="the job to pause")
    os.kill(int(pid), signal.SIGKILL)
    done = run.wait_for_status(job_id, {"finished", "failed"})
    assert done["status"] == "finished", done
    assert done["attempts"] == 2
    assert index_count(run) == before + len(CORPUS)
    found = [r["id"] for r in search(run, "anything at all", k=100, where={"run": prefix})]
    assert sorted(found) == sorted(f"{prefix}-{key}" for key in CORPUS)


def test_a_web_process_takes_requests_only_once_search_is_loaded(module_db, session_env, tmp_path):
    # SEARCH_WARMUP=1, as deployed: from the first answer on, every process has its model and
    # replica loaded, so no client waits for a cold search.
    warm = WebService(dict(session_env, SEARCH_WARMUP="1", WEB_CONCURRENCY="2"), tmp_path)
    try:
        for _ in range(10):  # spread over both processes
            info = requests.get(warm.url("/index"), timeout=30).json()
            assert info["replica"]["status"] == "ready", info
        ready = requests.get(warm.url("/readyz"), timeout=30).json()
        checks = ready.get("checks") or ready["error"]["details"]["checks"]
        assert checks["search"] == "ready"
    finally:
        warm.kill()


def test_above_the_exact_threshold_a_web_process_searches_an_hnsw_snapshot(
    embedder, module_db, session_env, tmp_path
):
    # A tiny threshold and snapshot interval: the web process writes an HNSW snapshot, maps it
    # (with its documents file) and answers from it, filters included.
    settings = {"INDEX_EXACT_UP_TO": "4", "SNAPSHOT_EVERY": "8", "INDEX_DIR": str(tmp_path / "index")}
    graph = WebService(dict(session_env, SEARCH_WARMUP="1", WEB_CONCURRENCY="1", **settings), tmp_path)
    try:
        prefixes = [uuid.uuid4().hex[:8] for _ in range(2)]
        for prefix in prefixes:
            embed(graph, tagged(prefix))

        def replica() -> dict:
            return requests.get(graph.url("/index"), timeout=30).json()["replica"]

        wait_until(lambda: replica()["search"] == "approximate", timeout=60, what="an HNSW snapshot")
        info = requests.get(graph.url("/index"), timeout=30).json()
        assert info["snapshot"]["search"] == "approximate" and info["snapshot"]["documents"] >= 16
        assert list((tmp_path / "index").glob("*.sqlite")) and list((tmp_path / "index").glob("*.faiss"))
        for prefix in prefixes:
            for key, query in PARAPHRASES.items():
                results = search(graph, query, k=3, base=graph.base, where={"run": prefix})
                assert results[0]["id"] == f"{prefix}-{key}", (query, results)
        scrape = requests.get(graph.url("/metrics"), timeout=30).text
        assert "afterward_index_approximate 1.0" in scrape
    finally:
        graph.kill()


# ------------------------------------------------------------------ documents belong to their key

KEY_A, KEY_B = "alpha-key-0123456789", "beta-key-9876543210"


def call(web: WebService, key: str, method: str, path: str, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return requests.request(method, web.url(path), headers=headers, timeout=60, **kwargs)


def submit_as(web: WebService, key: str, body: dict) -> requests.Response:
    return call(web, key, "POST", "/jobs/embed", json=body)


def ended(web: WebService, key: str, job_id: str) -> dict:
    def end() -> dict | None:
        view = call(web, key, "GET", f"/jobs/{job_id}", params={"wait": 5}).json()
        return view if view["status"] in {"finished", "failed"} else None

    return wait_until(end, timeout=120, what=f"job {job_id} to end")


def embed_as(web: WebService, key: str, body: dict) -> dict:
    response = submit_as(web, key, body)
    assert response.status_code == 202, response.text
    view = ended(web, key, response.json()["id"])
    assert view["status"] == "finished", view
    return view["result"]


def search_as(web: WebService, key: str, query: str, k: int = 10, where: dict | None = None) -> list[dict]:
    body = {"query": query, "k": k, **({"filter": where} if where else {})}
    response = call(web, key, "POST", "/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_two_keys_never_see_or_change_each_others_documents(embedder, module_db, session_env, tmp_path):
    # A tiny INDEX_EXACT_UP_TO: the web process answers from an HNSW snapshot and its own tail.
    settings = {"INDEX_EXACT_UP_TO": "4", "SNAPSHOT_EVERY": "8", "INDEX_DIR": str(tmp_path / "index")}
    env = dict(session_env, API_KEYS=f"{KEY_A},{KEY_B}", SEARCH_WARMUP="1", WEB_CONCURRENCY="1", **settings)
    web = WebService(env, tmp_path)
    try:
        run = uuid.uuid4().hex[:8]
        ids = {key: f"{run}-{key}" for key in CORPUS}
        mine = [{"id": ids[key], "text": text, "metadata": {"run": run}} for key, text in CORPUS.items()]
        assert sorted(embed_as(web, KEY_A, {"documents": mine})["indexed"]) == sorted(ids.values())
        # B writes the same ids: documents of its own, A's stay as they are.
        theirs = {key: f"Entry {n} of the other ledger, line {7 * n}." for n, key in enumerate(CORPUS)}
        body = [{"id": ids[key], "text": theirs[key], "metadata": {"run": run}} for key in CORPUS]
        assert sorted(embed_as(web, KEY_B, {"documents": body})["indexed"]) == sorted(ids.values())

        def index(key: str) -> dict:
            return call(web, key, "GET", "/index").json()

        wait_until(lambda: index(KEY_A)["replica"]["search"] == "approximate", timeout=60, what="a snapshot")

        def check() -> None:
            for key, query in PARAPHRASES.items():
                found = search_as(web, KEY_A, query, k=3, where={"run": run})
                assert found[0]["id"] == ids[key] and found[0]["text"] == CORPUS[key], (query, found)
                for hit in search_as(web, KEY_B, query, k=20) + search_as(web, KEY_B, CORPUS[key], k=20):
                    assert hit["text"] not in CORPUS.values(), hit
                assert call(web, KEY_A, "GET", f"/documents/{ids[key]}").json()["text"] == CORPUS[key]

        check()  # from the snapshot
        for key in CORPUS:
            assert call(web, KEY_B, "GET", f"/documents/{ids[key]}").json()["text"] == theirs[key]
            deleted = call(web, KEY_B, "DELETE", f"/documents/{ids[key]}")
            assert deleted.json() == {"id": ids[key], "deleted": True}
            assert call(web, KEY_B, "DELETE", f"/documents/{ids[key]}").status_code == 404
            assert call(web, KEY_B, "GET", f"/documents/{ids[key]}").status_code == 404
        assert search_as(web, KEY_B, "ledger", k=20, where={"run": run}) == []  # read-your-deletes
        check()  # B's deletes took nothing of A's
        assert index(KEY_A)["caller"]["documents"] == len(CORPUS)
        assert index(KEY_B)["caller"]["documents"] == 0
        # B writes one of its ids again, after its delete: its own again, A's untouched.
        again = embed_as(web, KEY_B, {"id": ids["cat"], "text": theirs["cat"], "metadata": {"run": run}})
        assert again["indexed"] == [ids["cat"]]
        hits = search_as(web, KEY_B, theirs["cat"], k=5, where={"run": run})
        assert [hit["id"] for hit in hits] == [ids["cat"]]
        check()
    finally:
        web.kill()


def test_a_shared_index_refuses_other_keys_writes_and_caps_hold_under_concurrent_submits(
    module_db, session_env, tmp_path
):
    # Its own database: the module's embedder writes with the default scope and caps.
    with scratch_database(url=module_db.base_url) as db:
        env = dict(
            session_env,
            REDIS_URL=db.url,
            API_KEYS=f"{KEY_A},{KEY_B}",
            RATE_LIMIT="off",
            INDEX_SCOPE="shared",
            KEY_MAX_DOCUMENTS="25",
            INDEX_DIR=str(tmp_path / "index"),
            LOG_FILE=str(tmp_path / "jobs.log"),
        )
        web = WebService(dict(env, WEB_CONCURRENCY="1"), tmp_path)
        embedders = None
        try:
            # Submitted before any embedder runs: every request is accepted (nothing is stored
            # yet), and the writes must hold the cap themselves.
            def five(batch: int) -> requests.Response:
                return submit_as(web, KEY_A, {"documents": [{"text": f"{batch} {i}"} for i in range(5)]})

            with ThreadPoolExecutor(8) as pool:
                responses = list(pool.map(five, range(8)))
            assert [r.status_code for r in responses] == [202] * 8
            embedders = start_workers(env, tmp_path, count=2, kind="embedder")
            results = [ended(web, KEY_A, r.json()["id"])["result"] for r in responses]
            assert sum(len(r["indexed"]) for r in results) == 25
            assert sum(len(r["quota_exceeded"]) for r in results) == 15
            info = call(web, KEY_A, "GET", "/index").json()
            assert info["scope"] == "shared" and info["documents"] == 25
            assert info["caller"]["documents"] == 25 and info["caller"]["max_documents"] == 25
            refused = submit_as(web, KEY_A, {"text": "one more"})
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
            assert refused.json()["error"]["details"]["documents"] == 25

            # B can read and search A's documents, but not replace or delete them.
            taken = next(doc_id for result in results for doc_id in result["indexed"])  # any written one
            original = call(web, KEY_A, "GET", f"/documents/{taken}").json()["text"]
            two = [{"id": taken, "text": "B's"}, {"id": "b", "text": "B's"}]
            outcome = embed_as(web, KEY_B, {"documents": two})
            assert outcome["refused"] == [taken] and outcome["indexed"] == ["b"]
            assert call(web, KEY_B, "GET", f"/documents/{taken}").json()["text"] == original
            assert call(web, KEY_B, "DELETE", f"/documents/{taken}").status_code == 403
            assert taken in [hit["id"] for hit in search_as(web, KEY_B, original, k=5)]
            assert call(web, KEY_A, "DELETE", f"/documents/{taken}").status_code == 200
            assert embed_as(web, KEY_A, {"text": "room again"})["indexed"]
        finally:
            if embedders is not None:
                embedders.kill()
            web.kill()
