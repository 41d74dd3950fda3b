"""The index above INDEX_EXACT_UP_TO: HNSW snapshots, dead positions, rebuilds, filters, and
snapshots written while searches and writes go on (fakeredis, clustered stand-in vectors)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from jobs import keys
from jobs.index import snapshots
from jobs.index.replica import Replica
from jobs.index.store import DocumentStore

DIMS = 32
MODEL = "stand-in"
COUNT = 3000


def clustered(rng: np.random.Generator, count: int, centres: np.ndarray) -> np.ndarray:
    """Unit vectors around `centres`, as sentence embeddings cluster by topic."""
    picks = centres[rng.integers(0, len(centres), count)]
    vectors = picks + rng.standard_normal(picks.shape).astype(np.float32) * 0.3
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def corpus():
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((60, DIMS)).astype(np.float32)
    return clustered(rng, COUNT, centres), clustered(rng, 100, centres), rng, centres


def replica_at(fake_redis, tmp_path: Path, exact_up_to: int = 1000) -> Replica:
    replica = Replica(fake_redis, DIMS, directory=tmp_path)
    replica.exact_up_to = exact_up_to
    return replica


def snapshot_written(connection, directory: Path) -> Replica:
    """A replica that replayed every change so far and wrote them as the snapshot."""
    writer = replica_at(connection, directory)
    writer.sync()
    writer.write_snapshot()
    return writer


def loaded(connection, directory: Path) -> Replica:
    """A replica of the host `directory`, loaded from the latest snapshot."""
    reader = replica_at(connection, directory)
    reader.load()
    return reader


def fill(fake_redis, vectors: np.ndarray, revision: int = 1, offset: int = 0) -> None:
    docs = [
        {"id": f"d{offset + i}", "text": f"text {offset + i}", "metadata": {"group": (offset + i) % 100}}
        for i in range(len(vectors))
    ]
    DocumentStore(fake_redis).upsert(docs, vectors, revision=revision, model=MODEL)


def recall(replica: Replica, vectors: dict[str, np.ndarray], queries: np.ndarray, k: int = 10) -> float:
    """Share of the exact top k (of the vectors as stored: float16) that a search finds."""
    ids = list(vectors)
    matrix = np.stack([vectors[i] for i in ids]).astype(np.float16).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    found = 0
    for query in queries:
        exact = {ids[i] for i in np.argsort(-(matrix @ query))[:k]}
        found += len(exact & {doc_id for doc_id, _ in replica.search(query, k)})
    return found / (k * len(queries))


def test_above_the_threshold_the_snapshot_is_an_hnsw_graph_with_high_recall(fake_redis, tmp_path, corpus):
    vectors, queries, _, _ = corpus
    fill(fake_redis, vectors)
    writer = replica_at(fake_redis, tmp_path)
    writer.sync()
    truth = {f"d{i}": v for i, v in enumerate(vectors)}
    assert recall(writer, truth, queries) == 1.0  # changes since a snapshot are searched exactly
    assert writer.write_snapshot()
    assert fake_redis.hget(keys.INDEX_SNAPSHOT, "kind") == b"hnsw"
    reader = loaded(fake_redis, tmp_path)
    assert reader.approximate and len(reader) == COUNT and reader.tail.ntotal == 0
    assert recall(reader, truth, queries) >= 0.95


def test_changes_to_an_hnsw_snapshot_extend_it_in_place_and_dead_vectors_stay_unseen(
    fake_redis, tmp_path, corpus
):
    vectors, queries, rng, centres = corpus
    fill(fake_redis, vectors)
    writer = snapshot_written(fake_redis, tmp_path)
    store = DocumentStore(fake_redis)
    # Replace 50 documents with new vectors, delete 50, add 100.
    replaced = clustered(rng, 50, centres)
    store.upsert(
        [{"id": f"d{i}", "text": "replaced", "metadata": {"group": i % 100}} for i in range(50)],
        replaced,
        revision=2,
        model=MODEL,
    )
    for i in range(50, 100):
        store.delete(f"d{i}", revision=3)
    added = clustered(rng, 100, centres)
    fill(fake_redis, added, revision=4, offset=COUNT)
    truth = {f"d{i}": v for i, v in enumerate(vectors) if not 50 <= i < 100}
    truth.update({f"d{i}": v for i, v in enumerate(replaced)})
    truth.update({f"d{COUNT + i}": v for i, v in enumerate(added)})

    writer.sync()
    assert len(writer) == len(truth) and writer.hidden == set(range(100))
    assert recall(writer, truth, queries) >= 0.95
    writer.write_snapshot()  # 100 dead of 3,000: extended in place
    reader = loaded(fake_redis, tmp_path)
    assert reader.base.ntotal == COUNT + 150 and reader.base_dead == 100 and len(reader) == len(truth)
    assert reader.hidden == set(range(100)) and reader.tail.ntotal == 0
    assert recall(reader, truth, queries) >= 0.95
    deleted = {f"d{i}" for i in range(50, 100)}
    for query in np.concatenate([queries, vectors[50:100]]):
        assert not deleted & {doc_id for doc_id, _ in reader.search(query, 10)}
    # The old vector of a replaced document is not found; its new one is, with its own score.
    assert reader.search(replaced[3], 1) == [("d3", pytest.approx(1.0, abs=1e-4))]
    assert dict(reader.search(vectors[3], 10)).get("d3", 0) < 0.99


def test_an_hnsw_snapshot_with_many_dead_vectors_is_rebuilt_from_the_live_ones(fake_redis, tmp_path, corpus):
    vectors, queries, _, _ = corpus
    fill(fake_redis, vectors)
    writer = snapshot_written(fake_redis, tmp_path)
    store = DocumentStore(fake_redis)
    for i in range(400):  # over DEAD_SHARE of the graph
        store.delete(f"d{i}", revision=2)
    writer.sync()
    writer.write_snapshot()
    reader = loaded(fake_redis, tmp_path)
    assert reader.approximate and reader.base.ntotal == COUNT - 400 and reader.base_dead == 0
    truth = {f"d{i}": v for i, v in enumerate(vectors) if i >= 400}
    assert recall(reader, truth, queries) >= 0.95
    # Fallen below the threshold: the next snapshot is exact again.
    for i in range(400, 2200):
        store.delete(f"d{i}", revision=3)
    reader.sync()
    reader.write_snapshot()
    again = replica_at(fake_redis, tmp_path)
    again.load()
    assert not again.approximate and len(again) == 800
    # Exact over the vectors it holds (which went through the graph's float16 storage).
    held = again.base.reconstruct_n(0, again.base.ntotal)
    names = again.base_docs.doc_ids(list(range(again.base.ntotal)))
    for query in queries:
        best = [names[int(i)] for i in np.argsort(-(held @ query), kind="stable")[:10]]
        assert [doc_id for doc_id, _ in again.search(query, 10)] == best
    assert recall(again, {f"d{i}": v for i, v in enumerate(vectors) if i >= 2200}, queries) >= 0.99


def test_filters_on_an_hnsw_snapshot_find_the_exact_top_k(fake_redis, tmp_path, corpus):
    vectors, queries, _, _ = corpus
    fill(fake_redis, vectors)
    snapshot_written(fake_redis, tmp_path)
    reader = loaded(fake_redis, tmp_path)
    assert reader.approximate and len(reader.metadata) == 0  # the snapshot's metadata stays on disk
    group = [i for i in range(COUNT) if i % 100 == 7]  # 1% of the documents
    for query in queries[:20]:
        exact = [f"d{group[i]}" for i in np.argsort(-(vectors[group] @ query))[:10]]
        assert [doc_id for doc_id, _ in reader.search(query, 10, {"group": 7})] == exact
    assert reader.search(queries[0], 10, {"group": 1000}) == []


def test_searches_and_writes_go_on_while_a_snapshot_is_built(fake_redis, tmp_path, corpus, monkeypatch):
    vectors, _, _, _ = corpus
    fill(fake_redis, vectors[:500])
    writer = replica_at(fake_redis, tmp_path, exact_up_to=100)
    writer.sync()
    building, release = threading.Event(), threading.Event()
    real_add = snapshots._add

    def slow_add(index, batch, keep_alive):
        building.set()
        assert release.wait(30)
        real_add(index, batch, keep_alive)

    monkeypatch.setattr(snapshots, "_add", slow_add)
    outcome: list[bool] = []
    thread = threading.Thread(target=lambda: outcome.append(writer.write_snapshot()))
    thread.start()
    try:
        assert building.wait(30)
        fill(fake_redis, vectors[500:510], revision=2, offset=500)  # a write meanwhile
        writer.sync()  # takes the replica's lock, which the build does not hold
        assert writer.search(vectors[505], 1) == [("d505", pytest.approx(1.0, abs=1e-3))]
    finally:
        release.set()
        thread.join(30)
    assert outcome == [True]
    # The snapshot holds what the writer had when it began; the write made meanwhile is replayed.
    fresh = replica_at(fake_redis, tmp_path, exact_up_to=100)
    fresh.load()
    assert len(fresh) == 510 and fresh.base.ntotal == 500
    assert fresh.search(vectors[505], 1) == [("d505", pytest.approx(1.0, abs=1e-3))]


def test_replicas_on_a_host_share_the_documents_file(fake_redis, tmp_path, corpus):
    vectors, _, _, _ = corpus
    fill(fake_redis, vectors[:200])
    snapshot_written(fake_redis, tmp_path)
    fake_redis.hset(keys.INDEX_SNAPSHOT, "unused", b"")  # nothing else read from Redis's copy
    elsewhere = tmp_path / "another-host"
    first, second = replica_at(fake_redis, elsewhere), replica_at(fake_redis, elsewhere)
    first.load()
    second.load()
    (documents,) = elsewhere.glob("*.sqlite")
    (vectors_file,) = elsewhere.glob("*.faiss")
    maps = Path("/proc/self/maps").read_text()
    assert maps.count(str(documents)) >= 2 and maps.count(str(vectors_file)) >= 2
    assert first.doc_ids == {} and second.search(vectors[42], 1)[0][0] == "d42"
    assert second.search(vectors[42], 3, {"group": 42})[0][0] == "d42"


def test_a_snapshot_of_an_earlier_release_still_loads(fake_redis, tmp_path, corpus):
    vectors, _, _, _ = corpus
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIMS))
    index.add_with_ids(vectors[:20], np.arange(1, 21, dtype=np.int64))
    blob = faiss.serialize_index(index).tobytes()
    documents = {str(i + 1): [f"d{i}", {"group": i % 2}] for i in range(20)}
    fake_redis.hset(keys.INDEX_CONFIG, mapping={"model": MODEL, "dimensions": DIMS, "epoch": "old"})
    fake_redis.hset(
        keys.INDEX_SNAPSHOT,
        mapping={
            "index:0": blob,
            "chunks": 1,
            "documents": json.dumps(documents),
            "position": "0-0",
            "version": 20,
            "trimmed_to": "0-0",
            "epoch": "old",
        },
    )
    replica = replica_at(fake_redis, tmp_path)
    replica.load()
    assert len(replica) == 20 and replica.base_version == 20
    assert replica.search(vectors[7], 1) == [("d7", pytest.approx(1.0, abs=1e-5))]
    assert {doc_id for doc_id, _ in replica.search(vectors[7], 20, {"group": 1})} == {
        f"d{i}" for i in range(1, 20, 2)
    }


@pytest.mark.integration
def test_a_snapshot_in_many_chunks_moves_through_a_real_redis_whole(
    real_redis, tmp_path, corpus, monkeypatch
):
    vectors, queries, rng, centres = corpus
    monkeypatch.setattr(snapshots, "SNAPSHOT_CHUNK", 64 * 1024)
    fill(real_redis, vectors)
    writer = replica_at(real_redis, tmp_path / "writer")
    writer.sync()
    assert writer.write_snapshot()
    stored = real_redis.hmget(keys.INDEX_SNAPSHOT, "index_chunks", "docs_chunks", "kind")
    assert int(stored[0]) > 3 and int(stored[1]) >= 1 and stored[2] == b"hnsw"
    assert not real_redis.exists(keys.INDEX_SNAPSHOT_STAGING)
    assert real_redis.xlen(keys.INDEX_CHANGES) == 0

    # A snapshot replaced while a new host copies it: the host copies the new one instead.
    real_download, replaced = snapshots.download, []

    def download_racing_a_writer(connection, version, name, chunks, target):
        if not replaced:
            replaced.append(version)
            DocumentStore(real_redis).upsert(
                [{"id": "late", "text": "late"}], clustered(rng, 1, centres), revision=2, model=MODEL
            )
            writer.sync()
            assert writer.write_snapshot()
        real_download(connection, version, name, chunks, target)

    monkeypatch.setattr(snapshots, "download", download_racing_a_writer)
    reader = replica_at(real_redis, tmp_path / "reader")
    reader.load()
    assert reader.base_version == writer.base_version > replaced[0]
    assert len(reader) == COUNT + 1 and reader.tail.ntotal == 0
    truth = {f"d{i}": v for i, v in enumerate(vectors)}
    assert recall(reader, truth, queries) >= 0.95
    assert [
        p.name for p in (tmp_path / "reader").iterdir() if p.name.startswith(".")
    ] == []  # no partial file


def test_a_broad_filter_searches_the_graph_with_more_candidates(fake_redis, tmp_path, corpus, monkeypatch):
    vectors, queries, _, _ = corpus
    fill(fake_redis, vectors)
    snapshot_written(fake_redis, tmp_path)
    reader = loaded(fake_redis, tmp_path)
    monkeypatch.setattr("jobs.index.replica.EXACT_FILTER_UP_TO", 10)  # 30 matches: the graph path
    group = [i for i in range(COUNT) if i % 100 == 7]
    found = 0
    for query in queries:
        exact = {f"d{group[i]}" for i in np.argsort(-(vectors[group] @ query))[:10]}
        results = [doc_id for doc_id, _ in reader.search(query, 10, {"group": 7})]
        assert set(results) <= {f"d{i}" for i in group}  # only documents the filter allows
        found += len(exact & set(results))
    assert found / (10 * len(queries)) >= 0.9
