"""The index (jobs.index) on fakeredis, with a small deterministic stand-in for the model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from jobs import keys
from jobs.index.replica import Replica
from jobs.index.store import DocumentStore, IndexMismatchError

DIMS = 16
MODEL = "stand-in"


def encode(texts: list[str]) -> np.ndarray:
    """Unit vectors seeded by each text: equal texts, equal vectors; different texts, far apart."""
    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        vector = np.random.default_rng(seed).standard_normal(DIMS).astype(np.float32)
        rows.append(vector / np.linalg.norm(vector))
    return np.stack(rows)


@pytest.fixture
def store(fake_redis):
    return DocumentStore(fake_redis)


@pytest.fixture
def replica(fake_redis):
    return Replica(fake_redis, DIMS)


def put(store: DocumentStore, docs: list[dict], revision: int) -> list[str]:
    return store.upsert(docs, encode([d["text"] for d in docs]), revision, model=MODEL)


def top(replica: Replica, text: str, k: int = 3, where: dict | None = None) -> list[str]:
    replica.sync()
    return [doc_id for doc_id, _ in replica.search(encode([text])[0], k, where)]


def test_upsert_then_search_finds_the_document(store, replica):
    assert put(store, [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}], revision=1) == [
        "indexed",
        "indexed",
    ]
    assert top(replica, "alpha")[0] == "a"
    assert top(replica, "beta")[0] == "b"
    hits = replica.search(encode(["alpha"])[0], 1)
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)  # cosine of a vector with itself
    assert store.get("a").text == "alpha"
    assert store.stats()["documents"] == 2


def test_reindexing_an_id_replaces_it_without_a_duplicate(store, replica, fake_redis):
    put(store, [{"id": "a", "text": "old text", "metadata": {"v": 1}}], revision=1)
    replica.sync()
    put(store, [{"id": "a", "text": "new text", "metadata": {"v": 2}}], revision=2)
    assert top(replica, "new text", k=10) == ["a"]
    assert len(replica) == 1
    assert store.get("a").text == "new text"
    assert store.get("a").metadata == {"v": 2}
    assert top(replica, "x", k=10, where={"v": 1}) == []
    assert top(replica, "x", k=10, where={"v": 2}) == ["a"]
    assert store.stats()["documents"] == 1


def test_a_retry_of_the_same_revision_changes_nothing(store, fake_redis):
    docs = [{"id": "a", "text": "alpha"}]
    put(store, docs, revision=5)
    changes = fake_redis.xlen(keys.INDEX_CHANGES)
    assert put(store, docs, revision=5) == ["indexed"]
    assert fake_redis.xlen(keys.INDEX_CHANGES) == changes


def test_an_older_revision_cannot_undo_a_newer_one(store, replica):
    put(store, [{"id": "a", "text": "newer"}], revision=10)
    assert put(store, [{"id": "a", "text": "older"}], revision=9) == ["superseded"]
    assert store.get("a").text == "newer"
    assert top(replica, "newer") == ["a"]


def test_delete_removes_from_search_and_store(store, replica):
    put(store, [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}], revision=1)
    replica.sync()
    assert store.delete("a", revision=2)
    assert top(replica, "alpha", k=10) == ["b"]
    assert store.get("a") is None
    assert not store.delete("a")
    assert store.stats()["documents"] == 1
    # A retry of a job accepted before the delete does not bring the document back...
    assert put(store, [{"id": "a", "text": "alpha"}], revision=1) == ["superseded"]
    # ...a later one does.
    assert put(store, [{"id": "a", "text": "alpha again"}], revision=3) == ["indexed"]
    assert "a" in top(replica, "alpha again")


def test_filters_are_equality_on_metadata_fields(store, replica):
    put(
        store,
        [
            {"id": "en1", "text": "one", "metadata": {"lang": "en", "year": 2024}},
            {"id": "en2", "text": "two", "metadata": {"lang": "en", "year": 2025}},
            {"id": "fr1", "text": "three", "metadata": {"lang": "fr", "year": 2024}},
        ],
        revision=1,
    )
    assert sorted(top(replica, "x", k=10, where={"lang": "en"})) == ["en1", "en2"]
    assert top(replica, "x", k=10, where={"lang": "en", "year": 2024}) == ["en1"]
    assert top(replica, "x", k=10, where={"year": 2024.0, "lang": "fr"}) == ["fr1"]
    assert top(replica, "x", k=10, where={"lang": "de"}) == []
    assert top(replica, "x", k=10, where={"missing": "field"}) == []
    assert top(replica, "three", k=1, where={"year": 2024}) == ["fr1"]


def test_changes_replay_in_order_within_one_batch(store, replica, fake_redis):
    put(store, [{"id": "a", "text": "first"}], revision=1)
    store.delete("a", revision=2)
    put(store, [{"id": "a", "text": "second"}], revision=3)
    put(store, [{"id": "b", "text": "other"}], revision=4)
    put(store, [{"id": "b", "text": "other, edited"}], revision=5)
    replica.sync()  # all five changes in one replay
    assert len(replica) == 2
    assert top(replica, "second", k=1) == ["a"]
    assert top(replica, "other, edited", k=1) == ["b"]


def test_snapshot_round_trip_and_trimmed_stream(store, replica, fake_redis):
    put(
        store, [{"id": f"d{i}", "text": f"text {i}", "metadata": {"n": i % 3}} for i in range(50)], revision=1
    )
    replica.sync()
    assert replica.write_snapshot()
    assert fake_redis.xlen(keys.INDEX_CHANGES) == 0  # everything is in the snapshot
    put(store, [{"id": "late", "text": "after the snapshot"}], revision=2)
    expected = top(replica, "text 7", k=5)

    fresh = Replica(fake_redis, DIMS)
    fresh.load()
    assert len(fresh) == 51
    assert top(fresh, "text 7", k=5) == expected
    assert top(fresh, "after the snapshot", k=1) == ["late"]
    assert sorted(top(fresh, "x", k=100, where={"n": 0})) == sorted(f"d{i}" for i in range(0, 50, 3))


def test_a_replica_behind_a_trimmed_stream_reloads(store, fake_redis):
    behind = Replica(fake_redis, DIMS)
    put(store, [{"id": "a", "text": "alpha"}], revision=1)
    behind.load()
    ahead = Replica(fake_redis, DIMS)
    ahead.load()
    put(store, [{"id": "b", "text": "beta"}], revision=2)
    ahead.sync()
    ahead.write_snapshot()  # trims the change `behind` has not seen
    assert top(behind, "beta", k=1) == ["b"]
    assert len(behind) == 2


def test_a_replica_notices_a_new_index(store, replica, fake_redis):
    put(store, [{"id": "a", "text": "alpha"}], revision=1)
    replica.sync()
    fake_redis.flushdb()  # Redis emptied under a running replica
    put(store, [{"id": "b", "text": "beta"}], revision=2)
    assert top(replica, "alpha", k=10) == ["b"]
    assert len(replica) == 1


def test_an_index_built_with_another_model_refuses_writes(store):
    put(store, [{"id": "a", "text": "alpha"}], revision=1)
    with pytest.raises(IndexMismatchError, match="stand-in"):
        store.upsert([{"id": "b", "text": "beta"}], encode(["beta"]), 2, model="another-model")


class CountingEncoder:
    """The stand-in encoder, counting calls and texts."""

    dimensions = DIMS
    name = MODEL

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return encode(texts)


def test_embed_many_encodes_once_and_keeps_each_jobs_revision(fake_redis, monkeypatch):
    from jobs.index import embedding
    from jobs.types.embed import embed_many

    encoder = CountingEncoder()
    monkeypatch.setattr(embedding, "get_encoder", lambda: encoder)
    store = DocumentStore(fake_redis)
    put(store, [{"id": "shared", "text": "accepted between the two"}], revision=5)
    calls = [
        {"documents": [{"id": "a", "text": "alpha"}, {"id": "shared", "text": "older"}], "revision": 4},
        {"documents": [{"id": "b", "text": "beta"}], "revision": 6},
        {"documents": [{"id": "shared", "text": "newest"}], "revision": 7},
    ]
    results = embed_many(calls, fake_redis)
    assert encoder.calls == [4]  # one encode for every text of the three jobs
    nothing = {"refused": [], "quota_exceeded": []}
    assert results == [
        {"indexed": ["a"], "superseded": ["shared"], **nothing},
        {"indexed": ["b"], "superseded": [], **nothing},
        {"indexed": ["shared"], "superseded": [], **nothing},
    ]
    assert store.get("shared").text == "newest"
    assert fake_redis.hget(keys.document("b"), "revision") == b"6"


def test_a_replica_holds_metadata_compactly(store, replica):
    # One request's worth of documents with their metadata at its limits (2 KB, 32 fields)
    # must not cost a web process more than a few times the metadata itself.
    import tracemalloc
    import uuid

    docs = [
        {
            "id": f"m{i}",
            "text": f"text {i}",
            "metadata": {f"field{f}": uuid.uuid4().hex * 1 + "x" * 26 for f in range(32)},
        }
        for i in range(256)
    ]
    raw = sum(len(json.dumps(d["metadata"], separators=(",", ":"))) for d in docs)
    put(store, docs, revision=1)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        replica.sync()
        held = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert held < 3 * raw, (held, raw)
    field, value = next(iter(docs[7]["metadata"].items()))
    assert [doc_id for doc_id, _ in replica.search(encode(["text 7"])[0], 3, {field: value})] == ["m7"]


def test_a_document_may_have_only_so_many_metadata_fields(client):
    from tests.test_api import post

    response = post(client, "embed", {"text": "x", "metadata": {f"f{i}": i for i in range(33)}})
    assert response.status_code == 422
    assert "33 fields" in json.dumps(response.get_json())


def test_redis_keeps_each_vector_once(store, replica, fake_redis):
    """The vector is in the change entry (then the snapshot), not also in the document's hash."""
    # A hash written before vectors left it keeps none after its next write either.
    fake_redis.hset(keys.document("a"), mapping={"vector": b"\0" * DIMS * 4})
    put(store, [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}], revision=1)
    assert all(not fake_redis.hexists(keys.document(doc_id), "vector") for doc_id in ("a", "b"))
    assert fake_redis.xlen(keys.INDEX_CHANGES) == 2
    assert top(replica, "alpha")[0] == "a"
    replica.write_snapshot()
    assert fake_redis.xlen(keys.INDEX_CHANGES) == 0  # the snapshot holds them now
    fresh = Replica(fake_redis, DIMS)
    fresh.load()
    assert top(fresh, "beta")[0] == "b"


def clustered(rng: np.random.Generator, count: int, centres: np.ndarray) -> np.ndarray:
    """Unit vectors around `centres`, as sentence embeddings cluster by topic (top-1 cosine ~0.8)."""
    picks = centres[rng.integers(0, len(centres), count)]
    vectors = picks + rng.standard_normal(picks.shape).astype(np.float32) * 0.05
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_float16_change_entries_keep_the_top_10_of_float32(fake_redis):
    """Vectors travel as float16 (half the bytes); searches agree with float32 on >= 99% of the top 10."""
    dims, rng = 384, np.random.default_rng(11)
    centres = rng.standard_normal((40, dims)).astype(np.float32)
    vectors = clustered(rng, 2000, centres)
    queries = clustered(rng, 100, centres)
    store, replica = DocumentStore(fake_redis), Replica(fake_redis, dims)
    docs = [{"id": f"d{i}", "text": f"document {i}"} for i in range(len(vectors))]
    store.upsert(docs, vectors, revision=1, model=MODEL)
    entry = fake_redis.xrange(keys.INDEX_CHANGES, count=1)[0][1]
    assert len(entry[b"vector"]) == dims * 2
    replica.sync()
    exact = [{f"d{i}" for i in np.argsort(-(vectors @ q), kind="stable")[:10]} for q in queries]
    found = [{doc_id for doc_id, _ in replica.search(q, 10)} for q in queries]
    agreement = sum(len(a & b) for a, b in zip(exact, found, strict=True)) / (10 * len(queries))
    assert agreement >= 0.99, agreement
    # Scores stay cosines: a stored vector against itself.
    assert replica.search(vectors[0], 1)[0] == ("d0", pytest.approx(1.0, abs=1e-3))


def test_float32_entries_written_before_still_load(fake_redis, replica):
    vector = encode(["old"])[0]
    fake_redis.xadd(
        keys.INDEX_CHANGES,
        {
            "op": "upsert",
            "id": "old",
            "int_id": 1,
            "vector": vector.tobytes(),
            "metadata": "{}",
            "version": 1,
        },
    )
    replica.sync()
    assert replica.search(vector, 1) == [("old", pytest.approx(1.0, abs=1e-6))]


# ------------------------------------------------------------------ one copy of the vectors per host


def snapshot_of(store, fake_redis, docs, tmp_path) -> Replica:
    writer = Replica(fake_redis, DIMS, directory=tmp_path)
    put(store, docs, revision=1)
    writer.sync()
    assert writer.write_snapshot()
    return writer


def test_replicas_on_a_host_map_one_file_of_the_snapshot(store, fake_redis, tmp_path):
    snapshot_of(store, fake_redis, [{"id": f"d{i}", "text": f"text {i}"} for i in range(20)], tmp_path)
    first, second = (
        Replica(fake_redis, DIMS, directory=tmp_path),
        Replica(fake_redis, DIMS, directory=tmp_path),
    )
    first.load()
    second.load()
    (file,) = tmp_path.glob("*.faiss")
    maps = Path("/proc/self/maps").read_text()
    assert maps.count(str(file)) >= 2  # mapped by both, not read into private memory
    assert len(first) == len(second) == 20 and first.tail.ntotal == 0
    assert top(second, "text 7")[0] == "d7"


def test_changes_after_the_snapshot_are_searched_exactly(store, fake_redis, tmp_path):
    docs = [{"id": f"d{i}", "text": f"text {i}", "metadata": {"group": i % 2}} for i in range(10)]
    snapshot_of(store, fake_redis, docs, tmp_path)
    replica = Replica(fake_redis, DIMS, directory=tmp_path)
    replica.load()
    put(
        store, [{"id": "d1", "text": "renamed", "metadata": {"group": 1}}], revision=2
    )  # replaces a base vector
    store.delete("d2", revision=3)
    put(store, [{"id": "new", "text": "brand new", "metadata": {"group": 0}}], revision=4)
    assert top(replica, "renamed", k=1) == ["d1"]
    scores = dict(replica.search(encode(["text 1"])[0], 10))
    assert scores["d1"] < 0.9  # its old vector (cosine 1.0) is hidden
    assert "d2" not in scores and set(scores) == {f"d{i}" for i in range(10)} - {"d2"} | {"new"}
    assert top(replica, "brand new", k=1) == ["new"]
    assert len(replica) == 10 and replica.hidden == {1, 2}  # positions of d1 and d2
    assert top(replica, "text 4", k=10, where={"group": 0}) == top(
        replica, "text 4", k=10, where={"group": 0}
    )
    assert set(top(replica, "text 4", k=10, where={"group": 0})) == {"d0", "d4", "d6", "d8", "new"}
    assert set(top(replica, "renamed", k=10, where={"group": 1})) == {"d1", "d3", "d5", "d7", "d9"}
    # Merged into the next snapshot: a fresh replica sees the same.
    assert replica.write_snapshot()
    fresh = Replica(fake_redis, DIMS, directory=tmp_path)
    fresh.load()
    assert fresh.tail.ntotal == 0 and not fresh.hidden and len(fresh) == 10
    assert top(fresh, "renamed", k=1) == ["d1"] and dict(fresh.search(encode(["text 1"])[0], 10)) == scores
    assert len(list(tmp_path.glob("*.faiss"))) == 1  # the older snapshot's file is gone


def test_a_replica_moves_to_a_newer_snapshot_once_its_tail_is_long(store, fake_redis, tmp_path, monkeypatch):
    monkeypatch.setattr("jobs.index.replica.REBASE_AFTER", 3)
    writer = snapshot_of(store, fake_redis, [{"id": "a", "text": "alpha"}], tmp_path)
    reader = Replica(fake_redis, DIMS, directory=tmp_path)
    reader.load()
    put(store, [{"id": f"n{i}", "text": f"new {i}"} for i in range(3)], revision=2)
    writer.sync()
    writer.write_snapshot(trim=False)
    reader.sync()  # its tail would hold 3: it maps the newer snapshot instead
    assert reader.base_version == writer.version and reader.tail.ntotal == 0 and len(reader) == 4
    assert top(reader, "new 2", k=1) == ["n2"]
