"""Micro-batching for embed jobs: one `encode` call for the job at hand and those queued behind it.

Encoding texts one at a time wastes most of the model's speed; encoding many at once is
several times faster. An embed job therefore looks at the embed jobs waiting behind it,
claims the ones no other worker has claimed (SET NX), encodes their texts together with its
own, and leaves their vectors in Redis for a few minutes. When those jobs run — on this
worker or another — they find their vectors ready and skip encoding.

Nothing about the jobs themselves changes: each keeps its own id, status, retries and
result, and runs through the normal job lifecycle. The vectors are only a cache: if a claim
is lost with its worker, or a cached entry expires, the job simply encodes its own texts.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from jobs import keys
from jobs.families import EMBED, family_queues

if TYPE_CHECKING:
    from jobs.index.embedding import TextEncoder

# How long a claim and a cached result live (seconds).
CLAIM_TTL = 60
VECTORS_TTL = 300
# How long a job waits for the vectors another worker promised to encode (seconds).
WAIT_FOR_CLAIMED = 10.0
# How long a job waits for more jobs to join its batch when they are trickling in (seconds).
GATHER_WINDOW = 0.05


def vectors_for(
    connection: redis.Redis,
    job_id: str,
    texts: list[str],
    encoder: TextEncoder,
    batch_texts: int,
    function: str,
) -> np.ndarray:
    """This job's vectors: cached by a neighbour, or encoded now along with its neighbours'."""
    cached = _cached(connection, job_id, len(texts), encoder.dimensions)
    if cached is not None:
        return cached
    if not connection.set(keys.embed_claim(job_id), "1", nx=True, ex=CLAIM_TTL):
        # Another worker is encoding this job's texts with its own batch: wait for them.
        deadline = time.monotonic() + WAIT_FOR_CLAIMED
        while time.monotonic() < deadline:
            time.sleep(0.02)
            cached = _cached(connection, job_id, len(texts), encoder.dimensions)
            if cached is not None:
                return cached
        return encoder.encode(texts)
    room = batch_texts - len(texts)
    neighbours = _claim_neighbours(connection, job_id, room, function)
    claimed = sum(len(their_texts) for _, their_texts in neighbours)
    if 0 < claimed < room // 2:
        # Jobs are arriving one by one: give the stream a moment to fill the batch.
        time.sleep(GATHER_WINDOW)
        neighbours += _claim_neighbours(connection, job_id, room - claimed, function)
    all_texts = list(texts)
    for _, their_texts in neighbours:
        all_texts += their_texts
    vectors = encoder.encode(all_texts)
    mine, start = vectors[: len(texts)], len(texts)
    with connection.pipeline(transaction=False) as pipe:
        for their_id, their_texts in neighbours:
            theirs = vectors[start : start + len(their_texts)]
            start += len(their_texts)
            pipe.set(keys.embed_vectors(their_id), theirs.tobytes(), ex=VECTORS_TTL)
        pipe.execute()
    return mine


def _cached(connection: redis.Redis, job_id: str, count: int, dimensions: int) -> np.ndarray | None:
    raw = connection.get(keys.embed_vectors(job_id))
    if raw is None or len(raw) != count * dimensions * 4:
        return None
    return np.frombuffer(raw, dtype=np.float32).reshape(count, dimensions)


def _claim_neighbours(
    connection: redis.Redis, job_id: str, room: int, function: str
) -> list[tuple[str, list[str]]]:
    """Embed jobs waiting in the embed queues, up to `room` texts, that this worker now owns.

    Claims are taken from the back of the queues: the other workers take jobs from the front,
    find them unclaimed and encode batches of their own meanwhile, instead of waiting for ours.
    """
    if room <= 0:
        return []
    waiting: list[str] = []
    for queue in reversed(family_queues(EMBED)):
        waiting += [i.decode() for i in reversed(connection.lrange(f"rq:queue:{queue}", -4 * room, -1))]
    waiting = [i for i in dict.fromkeys(waiting) if i != job_id]
    with connection.pipeline(transaction=False) as pipe:
        for other in waiting:
            pipe.exists(keys.embed_claim(other))
        free = [other for other, taken in zip(waiting, pipe.execute(), strict=True) if not taken][:room]
    candidates = []
    # RQ's plain job class: only the stored arguments are read here, never the function.
    for other, job in zip(
        free, Job.fetch_many(free, connection=connection, serializer=JSONSerializer), strict=True
    ):
        if job is None or job.func_name != function:
            continue
        texts = [document["text"] for document in job.kwargs.get("documents", [])]
        if texts and len(texts) <= room:
            candidates.append((other, texts))
            room -= len(texts)
        if room <= 0:
            break
    with connection.pipeline(transaction=False) as pipe:
        for other, _ in candidates:
            pipe.set(keys.embed_claim(other), "1", nx=True, ex=CLAIM_TTL)
        won = pipe.execute()
    return [candidate for candidate, ok in zip(candidates, won, strict=True) if ok]


def forget(connection: redis.Redis, job_id: str) -> None:
    """Drop a job's cached vectors once they are written to the index."""
    connection.delete(keys.embed_vectors(job_id), keys.embed_claim(job_id))
