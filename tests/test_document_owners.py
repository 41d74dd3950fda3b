"""Documents belong to the key that wrote them: namespaces, the shared scope, the per-key caps
and bounded filters (fakeredis, the stand-in encoder). tests/test_search_integration.py makes
the same attacks through a real web process and embedder."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from jobs import keys
from jobs.index import owners
from jobs.index.owners import PUBLIC, SHARED
from jobs.index.replica import Replica
from jobs.index.snapshot_docs import SnapshotDocs
from jobs.index.store import DocumentStore, NotOwnerError, new_revision, size_of
from service.security import key_owner
from tests.test_api import assert_error, post
from tests.test_index import DIMS, MODEL, CountingEncoder, encode
from tests.test_security import KEY_A, KEY_B, make_app

A, B = key_owner(KEY_A), key_owner(KEY_B)
AS_A = {"Authorization": f"Bearer {KEY_A}"}
AS_B = {"Authorization": f"Bearer {KEY_B}"}


def put(store: DocumentStore, docs: list[dict], owner: str, revision: int | None = None) -> list[str]:
    vectors = encode([d["text"] for d in docs])
    return store.upsert(docs, vectors, revision or new_revision(), MODEL, owner=owner)


def ids(replica: Replica, text: str, namespace: str | None, k: int = 10, where: dict | None = None) -> list:
    replica.sync()
    return [stored for stored, _ in replica.search(encode([text])[0], k, where, namespace)]


def test_the_public_owner_is_the_open_apis():
    from service import security

    assert security.PUBLIC == owners.PUBLIC


# ------------------------------------------------------------------ a namespace per key


def test_key_b_cannot_read_overwrite_or_delete_key_as_document(fake_redis):
    store = DocumentStore(fake_redis)
    put(store, [{"id": "x", "text": "A's secret plan", "metadata": {"lang": "en"}}], A)
    assert store.get("x", B) is None  # read
    assert put(store, [{"id": "x", "text": "B was here"}], B) == ["indexed"]  # B's own x
    assert not store.delete("y", owner=B)
    assert store.delete("x", owner=B)  # B's x, not A's
    document = store.get("x", A)
    assert (document.id, document.text, document.metadata) == ("x", "A's secret plan", {"lang": "en"})
    assert store.get("x") is None  # nor is it the open API's
    assert fake_redis.exists(keys.document(f"{A}/x"))
    assert store.stats()["documents"] == 1


def test_a_search_sees_only_the_callers_documents_before_and_after_a_snapshot(fake_redis, tmp_path):
    store = DocumentStore(fake_redis)
    docs = [{"id": f"d{i}", "text": f"text {i}", "metadata": {"n": i % 2}} for i in range(20)]
    put(store, docs, A)
    put(store, docs[:10], B)
    replica = Replica(fake_redis, DIMS, directory=tmp_path)
    assert ids(replica, "text 15", A, k=1) == [f"{A}/d15"]
    assert f"{A}/d15" not in ids(replica, "text 15", B, k=20)  # the same text is B's only up to d9
    assert set(ids(replica, "text 3", B, k=50)) == {f"{B}/d{i}" for i in range(10)}
    assert set(ids(replica, "x", B, k=50, where={"n": 1})) == {f"{B}/d{i}" for i in range(1, 10, 2)}
    assert ids(replica, "text 3", PUBLIC, k=50) == []
    assert replica.write_snapshot()
    fresh = Replica(fake_redis, DIMS, directory=tmp_path)
    fresh.load()
    assert fresh.tail.ntotal == 0
    assert set(ids(fresh, "text 3", B, k=50)) == {f"{B}/d{i}" for i in range(10)}
    assert set(ids(fresh, "x", B, k=50, where={"n": 1})) == {f"{B}/d{i}" for i in range(1, 10, 2)}
    # Changes after the snapshot: B's new document, A's replaced one, B's deleted one.
    put(store, [{"id": "late", "text": "text 15"}], B)
    put(store, [{"id": "d3", "text": "text 3, edited"}], A)
    store.delete("d4", owner=B)
    assert ids(fresh, "text 15", B, k=1) == [f"{B}/late"]
    assert set(ids(fresh, "text 3", B, k=50)) == {f"{B}/d{i}" for i in range(10) if i != 4} | {f"{B}/late"}
    assert ids(fresh, "text 3, edited", A, k=1) == [f"{A}/d3"]


def clustered(rng: np.random.Generator, count: int, centres: np.ndarray) -> np.ndarray:
    picks = centres[rng.integers(0, len(centres), count)]
    vectors = picks + rng.standard_normal(picks.shape).astype(np.float32) * 0.3
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("through", ["storage scan", "graph"])
def test_an_hnsw_snapshot_keeps_namespaces_apart(fake_redis, tmp_path, monkeypatch, through):
    # Namespaces of 600 documents: scanned exactly, or (EXACT_FILTER_UP_TO below them) searched
    # through the graph with a bitmap of the namespace.
    if through == "graph":
        monkeypatch.setattr("jobs.index.replica.EXACT_FILTER_UP_TO", 100)
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((30, DIMS)).astype(np.float32)
    vectors = {owner: clustered(rng, 600, centres) for owner in (A, B, PUBLIC)}
    store = DocumentStore(fake_redis)
    for owner, matrix in vectors.items():
        docs = [{"id": f"d{i}", "text": f"{owner} {i}"} for i in range(len(matrix))]
        store.upsert(docs, matrix, new_revision(), MODEL, owner=owner)
    writer = Replica(fake_redis, DIMS, directory=tmp_path)
    writer.exact_up_to = 100
    writer.sync()
    assert writer.write_snapshot()
    reader = Replica(fake_redis, DIMS, directory=tmp_path)
    reader.load()
    assert reader.approximate and reader.tail.ntotal == 0
    queries = clustered(rng, 50, centres)
    found = 0
    for query in queries:
        hits = [stored for stored, _ in reader.search(query, 10, namespace=B)]
        assert len(hits) == 10 and all(stored.startswith(f"{B}/") for stored in hits)
        stored = vectors[B].astype(np.float16).astype(np.float32)
        exact = {f"{B}/d{i}" for i in np.argsort(-(stored @ query))[:10]}
        found += len(exact & set(hits))
    assert found / (10 * len(queries)) >= 0.9
    # The open API's namespace (bare ids) is one among others here: filtered too.
    assert all("/" not in stored for stored, _ in reader.search(queries[0], 10, namespace=PUBLIC))


def test_a_namespace_that_is_the_whole_snapshot_filters_nothing(fake_redis, tmp_path, monkeypatch):
    store = DocumentStore(fake_redis)
    put(store, [{"id": f"d{i}", "text": f"text {i}"} for i in range(30)], A)
    writer = Replica(fake_redis, DIMS, directory=tmp_path)
    writer.sync()
    writer.write_snapshot()
    reader = Replica(fake_redis, DIMS, directory=tmp_path)
    reader.load()

    def unexpected(owner):
        raise AssertionError("read a namespace's positions")

    monkeypatch.setattr(reader.base_docs, "namespace_positions", unexpected)
    assert ids(reader, "text 7", A, k=1) == [f"{A}/d7"]
    assert reader.base_docs.namespace_size(A) == 30


def test_snapshot_files_written_before_namespaces_are_read_by_their_ids(fake_redis, tmp_path):
    store = DocumentStore(fake_redis)
    put(store, [{"id": f"d{i}", "text": f"text {i}"} for i in range(10)], A)
    put(store, [{"id": f"d{i}", "text": f"text {i}"} for i in range(5)], PUBLIC)
    writer = Replica(fake_redis, DIMS, directory=tmp_path)
    writer.sync()
    writer.write_snapshot()
    (docs_file,) = tmp_path.glob("*.sqlite")
    with sqlite3.connect(docs_file) as db:  # as the earlier release wrote them
        db.execute("DROP TABLE namespaces")
        db.execute("DROP TABLE owners")
    old = SnapshotDocs(docs_file)
    assert old.namespace_size(A) == 10 and old.namespace_size(PUBLIC) == 5
    assert len(old.namespace_positions(A)) == 10
    old.close()
    reader = Replica(fake_redis, DIMS, directory=tmp_path)
    reader.load()
    assert set(ids(reader, "text 1", PUBLIC, k=20)) == {f"d{i}" for i in range(5)}
    assert len(ids(reader, "text 1", A, k=20)) == 10


def test_deletes_are_remembered_per_namespace(fake_redis):
    store = DocumentStore(fake_redis)
    accepted = new_revision()
    put(store, [{"id": "x", "text": "B's"}], B, revision=accepted)
    assert store.delete("x", owner=B)
    # A write accepted before B's delete cannot bring B's document back...
    assert put(store, [{"id": "x", "text": "B's"}], B, revision=accepted) == ["superseded"]
    # ...and B's delete is no tombstone of A's x.
    assert put(store, [{"id": "x", "text": "A's"}], A, revision=accepted) == ["indexed"]
    assert store.get("x", B) is None and store.get("x", A).text == "A's"


# ------------------------------------------------------------------ INDEX_SCOPE=shared


def test_in_a_shared_index_only_the_writer_may_replace_or_delete(fake_redis):
    store = DocumentStore(fake_redis, scope=SHARED)
    assert put(store, [{"id": "x", "text": "A's"}], A) == ["indexed"]
    assert put(store, [{"id": "x", "text": "B's"}, {"id": "y", "text": "B's own"}], B) == [
        "refused",
        "indexed",
    ]
    assert store.get("x", B).text == "A's"  # everyone reads and searches everything
    with pytest.raises(NotOwnerError):
        store.delete("x", owner=B)
    assert store.get("x", A).text == "A's"
    assert put(store, [{"id": "x", "text": "A's, edited"}], A) == ["indexed"]
    assert store.delete("x", owner=A)
    assert put(store, [{"id": "x", "text": "B's now"}], B) == ["indexed"]  # a deleted id is free
    assert store.usage(A).documents == 0 and store.usage(B).documents == 2


def test_an_embed_job_reports_another_keys_ids_as_refused(fake_redis, monkeypatch):
    from jobs.index import embedding
    from jobs.types.embed import embed_many

    monkeypatch.setenv("INDEX_SCOPE", "shared")
    monkeypatch.setattr(embedding, "get_encoder", CountingEncoder)
    calls = [
        {"documents": [{"id": "x", "text": "first"}], "revision": new_revision(), "owner": A},
        {
            "documents": [{"id": "x", "text": "second"}, {"id": "z", "text": "z"}],
            "revision": new_revision(),
            "owner": B,
        },
    ]
    results = embed_many(calls, fake_redis)
    assert results[1] == {"indexed": ["z"], "superseded": [], "refused": ["x"], "quota_exceeded": []}
    assert DocumentStore(fake_redis, scope=SHARED).get("x").text == "first"


# ------------------------------------------------------------------ caps at write time


def test_caps_hold_at_write_time_and_counts_follow_every_change(fake_redis):
    store = DocumentStore(fake_redis, max_documents=3, max_bytes=1000)
    docs = [{"id": f"d{i}", "text": "x" * 100} for i in range(5)]
    assert put(store, docs, A) == ["indexed"] * 3 + ["quota_exceeded"] * 2
    assert store.get("d3", A) is None
    usage = store.usage(A)
    assert (usage.documents, usage.bytes) == (3, 3 * size_of(docs[0]))
    # Replacing is not a new document; other keys have caps of their own.
    assert put(store, [{"id": "d0", "text": "y" * 200, "metadata": {"a": 1}}], A) == ["indexed"]
    assert put(store, docs[:3], B) == ["indexed"] * 3
    assert store.usage(A).bytes == 2 * size_of(docs[0]) + size_of({"text": "y" * 200, "metadata": {"a": 1}})
    # Bytes: 100 + 208 + 100 stored; 700 more would pass 1000, a shrink is always allowed.
    assert put(store, [{"id": "d1", "text": "z" * 700}], A) == ["quota_exceeded"]
    assert put(store, [{"id": "d0", "text": "small"}], A) == ["indexed"]
    assert store.delete("d2", owner=A)
    assert put(store, [{"id": "d3", "text": "x" * 100}], A) == ["indexed"]  # room again
    assert store.usage(A).documents == 3
    assert store.usage(A).bytes == sum(size_of({"text": store.get(i, A).text}) for i in ("d0", "d1", "d3"))
    # The open API's owner has no caps.
    assert put(store, [{"id": f"p{i}", "text": "p"} for i in range(10)], PUBLIC) == ["indexed"] * 10


@pytest.mark.integration
def test_caps_hold_when_many_writes_race(real_redis):
    from concurrent.futures import ThreadPoolExecutor

    store = DocumentStore(real_redis, max_documents=25)

    def write(batch: int) -> list[str]:
        return put(store, [{"id": f"b{batch}-{i}", "text": f"{batch} {i}"} for i in range(10)], A)

    with ThreadPoolExecutor(8) as pool:
        outcomes = [o for batch in pool.map(write, range(8)) for o in batch]
    assert outcomes.count("indexed") == 25 and outcomes.count("quota_exceeded") == 55
    assert store.usage(A).documents == 25 == store.stats()["documents"]


# ------------------------------------------------------------------ the API


@pytest.fixture
def keyed(fake_redis, tmp_path):
    return make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off", key_max_documents=3)


def stored(fake_redis, owner: str, docs: list[dict], **caps) -> None:
    assert set(put(DocumentStore(fake_redis, **caps), docs, owner)) == {"indexed"}


def test_submit_refuses_what_would_pass_a_cap_counting_only_new_ids(keyed, fake_redis):
    client = keyed.test_client()
    stored(fake_redis, A, [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}])
    error = assert_error(
        post(client, "embed", {"documents": [{"text": "new"}, {"id": "c", "text": "new"}]}, headers=AS_A),
        429,
        "quota_exceeded",
    )
    assert error["details"]["documents"] == 2 and error["details"]["max_documents"] == 3
    assert error["details"]["request_documents"] == 2
    assert not fake_redis.keys("rq:job:*")
    both = {"documents": [{"id": "a", "text": "again"}, {"id": "c", "text": "new"}]}
    assert post(client, "embed", both, headers=AS_A).status_code == 202  # one new id: fits
    assert (
        post(client, "embed", {"documents": [{"text": f"{i}"} for i in range(3)]}, headers=AS_B).status_code
        == 202
    )


def test_a_repeat_of_an_accepted_request_is_answered_at_the_cap(keyed, fake_redis):
    client = keyed.test_client()
    body = {"documents": [{"text": "first"}, {"text": "second"}]}  # ids assigned by the server
    once = post(client, "embed", body, headers={**AS_A, "Idempotency-Key": "batch-1"})
    assert once.status_code == 202
    stored(fake_redis, A, [{"id": f"d{i}", "text": "x"} for i in range(3)])  # the key is at its cap
    again = post(client, "embed", body, headers={**AS_A, "Idempotency-Key": "batch-1"})
    assert again.status_code == 200 and again.get_json()["id"] == once.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    refused = post(client, "embed", body, headers={**AS_A, "Idempotency-Key": "batch-2"})
    assert_error(refused, 429, "quota_exceeded")
    assert not fake_redis.exists(keys.idempotency(A, "batch-2"))  # a refusal keeps no claim
    assert fake_redis.zcard(keys.waiting(A)) == 1  # nor a place in the key's share: the first job's only


def test_submit_counts_the_requests_bytes(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="off", key_max_document_mb=1).test_client()
    # 104 x 10,002 bytes (the text and "{}"), below 1 MB; another 10,002 would pass it.
    stored(fake_redis, A, [{"id": f"d{i}", "text": "x" * 10_000} for i in range(104)])
    error = assert_error(post(client, "embed", {"text": "y" * 10_000}, headers=AS_A), 429, "quota_exceeded")
    assert error["details"]["bytes"] == 104 * 10_002 and error["details"]["max_bytes"] == 2**20
    assert error["details"]["request_bytes"] == 10_002
    # Replacing a document with a smaller one makes room rather than taking it.
    assert post(client, "embed", {"id": "d0", "text": "z" * 9_000}, headers=AS_A).status_code == 202


def test_without_api_keys_there_are_no_caps(fake_redis, tmp_path):
    client = make_app(tmp_path, key_max_documents=1).test_client()
    stored(fake_redis, PUBLIC, [{"id": "a", "text": "one"}])
    assert post(client, "embed", {"documents": [{"text": "1"}, {"text": "2"}]}).status_code == 202


def test_a_job_records_its_owner(keyed):
    client = keyed.test_client()
    job_id = post(client, "embed", {"text": "hello"}, headers=AS_A).get_json()["id"]
    from jobs.engine.job import Job

    job = Job.fetch(job_id, connection=keyed.extensions["afterward"].redis)
    assert job.kwargs["owner"] == A


def test_index_reports_the_callers_own_counts_and_caps(keyed, fake_redis):
    stored(fake_redis, A, [{"id": "a", "text": "one", "metadata": {"k": "v"}}])
    stored(fake_redis, B, [{"id": "a", "text": "two"}, {"id": "b", "text": "three"}])
    info = keyed.test_client().get("/index", headers=AS_A).get_json()
    assert info["documents"] == 3 and info["scope"] == "key"
    assert info["caller"] == {
        "owner": A,
        "documents": 1,
        "bytes": len("one") + len('{"k":"v"}'),
        "max_documents": 3,
        "max_bytes": 100 * 2**20,
    }


def test_documents_routes_answer_within_the_callers_namespace(keyed, fake_redis):
    client = keyed.test_client()
    stored(fake_redis, A, [{"id": "x", "text": "A's"}])
    assert_error(client.get("/documents/x", headers=AS_B), 404, "not_found")
    assert_error(client.delete("/documents/x", headers=AS_B), 404, "not_found")
    assert client.get("/documents/x", headers=AS_A).get_json()["text"] == "A's"
    assert client.delete("/documents/x", headers=AS_A).get_json() == {"id": "x", "deleted": True}


def test_in_a_shared_index_deleting_another_keys_document_is_403(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off", index_scope="shared").test_client()
    stored(fake_redis, A, [{"id": "x", "text": "A's"}], scope=SHARED)
    assert client.get("/documents/x", headers=AS_B).get_json()["text"] == "A's"
    assert_error(client.delete("/documents/x", headers=AS_B), 403, "forbidden")
    assert client.get("/documents/x", headers=AS_A).status_code == 200
    assert client.delete("/documents/x", headers=AS_A).status_code == 200


# ------------------------------------------------------------------ search filters


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({f"f{i}": i for i in range(33)}, "33 fields"),
        ({"blob": "x" * 3000}, "bytes as JSON"),
        ({"a": "é" * 1100}, "bytes as JSON"),  # bytes, not characters
        ([{"a": 1}], "valid dictionary"),
    ],
)
def test_a_filter_is_bounded_like_metadata(client, where, message):
    error = assert_error(
        client.post("/search", json={"query": "x", "filter": where}), 422, "validation_failed"
    )
    assert [detail["field"] for detail in error["details"]] == ["filter"]
    assert message in json.dumps(error, ensure_ascii=False)


def test_a_filter_costs_a_unit_per_field(fake_redis, tmp_path, monkeypatch):
    from service.views.search import search_cost

    assert search_cost("x", 10) == 1 and search_cost("x", 10, {"a": 1, "b": 2}) == 3
    app = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="off", search_budget=40)
    monkeypatch.setattr(app.extensions["afterward"].search, "search", lambda *args: [])
    client = app.test_client()
    broad = {"query": "x", "filter": {f"f{i}": i for i in range(32)}}  # costs 33
    assert client.post("/search", json=broad, headers=AS_A).status_code == 200
    assert_error(client.post("/search", json=broad, headers=AS_A), 429, "search_budget_exceeded")
    assert client.post("/search", json={"query": "x"}, headers=AS_A).status_code == 200


def test_a_search_asks_the_replica_for_the_callers_namespace_only(fake_redis, tmp_path, monkeypatch):
    asked = []
    for scope, expected in (("key", A), ("shared", None)):
        app = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="off", index_scope=scope)
        monkeypatch.setattr(
            app.extensions["afterward"].search,
            "search",
            lambda q, k, w, namespace: asked.append(namespace) or [],
        )
        assert app.test_client().get("/search?q=x", headers=AS_A).status_code == 200
        assert asked.pop() == expected


# ------------------------------------------------------------------ documents written before owners


def legacy(fake_redis, docs: list[dict]) -> None:
    """Documents as the store wrote them before owners: bare ids, no owner, not counted."""
    put(DocumentStore(fake_redis), docs, PUBLIC)
    for document in docs:
        fake_redis.hdel(keys.document(document["id"]), "owner")
    fake_redis.delete(keys.INDEX_OWNER_DOCUMENTS, keys.INDEX_OWNER_BYTES)


def test_documents_written_before_owners_are_the_open_apis(fake_redis, tmp_path):
    legacy(fake_redis, [{"id": "old", "text": "written before owners"}, {"id": "older", "text": "too"}])
    assert make_app(tmp_path).test_client().get("/documents/old").status_code == 200
    keyed = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="off").test_client()
    assert_error(keyed.get("/documents/old", headers=AS_A), 404, "not_found")
    assert_error(keyed.delete("/documents/old", headers=AS_A), 404, "not_found")
    shared = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="off", index_scope="shared").test_client()
    assert shared.get("/documents/old", headers=AS_A).get_json()["text"] == "written before owners"
    assert_error(shared.delete("/documents/old", headers=AS_A), 403, "forbidden")
    assert put(DocumentStore(fake_redis, scope=SHARED), [{"id": "old", "text": "mine now"}], A) == ["refused"]
    # The open API changes them as before; they count from their next write on.
    store = DocumentStore(fake_redis)
    assert store.usage(PUBLIC).documents == 0
    assert put(store, [{"id": "old", "text": "rewritten"}], PUBLIC) == ["indexed"]
    assert store.delete("older")
    usage = store.usage(PUBLIC)
    assert (usage.documents, usage.bytes) == (1, size_of({"text": "rewritten"}))


@pytest.mark.parametrize("scope", ["key", "shared"])
def test_adopt_gives_the_open_apis_documents_to_a_key(fake_redis, tmp_path, scope):
    from jobs.index.adopt import adopt
    from jobs.settings import Settings

    docs = [{"id": f"old{i}", "text": f"old text {i}", "metadata": {"i": i}} for i in range(300)]
    legacy(fake_redis, docs[:200])
    snapshot = Replica(fake_redis, DIMS, directory=tmp_path / "host")
    snapshot.sync()
    snapshot.write_snapshot()  # some vectors in a snapshot, some only in the stream
    legacy(fake_redis, docs[200:])
    put(DocumentStore(fake_redis, scope=scope), [{"id": "b's", "text": "old text 7"}], B)
    settings = Settings(index_scope=scope)
    assert adopt(fake_redis, A, settings) == 300
    store = DocumentStore(fake_redis, scope=scope)
    assert store.get("old7", A).metadata == {"i": 7}
    usage = store.usage(A)
    assert (usage.documents, usage.bytes) == (300, sum(size_of(d) for d in docs))
    replica = Replica(fake_redis, DIMS, directory=tmp_path / "another")
    replica.sync()
    namespace = A if scope == "key" else None
    for i in (7, 250):
        [(found, score)] = replica.search(encode([f"old text {i}"])[0], 1, namespace=namespace)
        assert found == owners.stored_id(scope, A, f"old{i}") and score == pytest.approx(1.0, abs=1e-3)
    if scope == "key":
        assert store.get("old7") is None and ids(replica, "old text 7", PUBLIC) == []
    else:
        assert put(store, [{"id": "old7", "text": "B's"}], B) == ["refused"]
    assert store.delete("old7", owner=A)
    assert store.get("b's", B).text == "old text 7"
    assert adopt(fake_redis, A, settings) == 0


def test_the_adopt_command_takes_a_keys_name(fake_redis, monkeypatch, capsys):
    from jobs.index import adopt

    with pytest.raises(SystemExit):
        adopt.main(["alpha-key"])
    assert "key- and 16 hex digits" in capsys.readouterr().err
    legacy(fake_redis, [{"id": "old", "text": "old"}])
    monkeypatch.setattr("jobs.connection.connect", lambda settings, role: fake_redis)
    assert adopt.main([A]) == 0
    assert f"1 document(s) of the open API are {A}'s now (key scope)" in capsys.readouterr().out
