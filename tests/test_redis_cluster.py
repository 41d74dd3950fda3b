"""Afterward does not run on Redis Cluster, not even with RQ's `RQ_KEY_PREFIX` hash tag: each
claim of the "Redis Cluster" section of docs/deploying.md, shown on a real cluster of three primaries.

An assertion failing here means Redis, redis-py or RQ changed: read that section again.

RQ reads `RQ_KEY_PREFIX` once, when it is imported, and this process imported it already, so
what needs the `{rq}` prefix runs in a child process: this module run as a script
(`python -m tests.test_redis_cluster PORT...`), which prints what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, CrossSlotTransactionError
from rq import Queue as RQQueue
from rq import Worker as RQWorker

from jobs import keys, quota
from jobs.index.store import DocumentStore
from scripts.processes import ROOT
from scripts.redis_cluster import LocalCluster

pytestmark = pytest.mark.integration

# The hash tag docs/deploying.md discusses: every RQ key then starts with it.
TAG = "{rq}"
QUEUES = ("high", "default", "low")
JOBS = 30

# Commands that touch no key: what a primary serves when it holds none of the work.
NO_KEY_COMMANDS = {"cluster", "command", "config", "dbsize", "info", "ping", "client", "readonly", "hello"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
def empty(cluster: LocalCluster) -> LocalCluster:
    reset(cluster.ports)
    return cluster


@pytest.fixture(scope="module")
def tagged(cluster: LocalCluster) -> dict[str, Any]:
    """What RQ and Afterward do on the cluster with RQ_KEY_PREFIX={rq} (see `observe`)."""
    env = dict(os.environ, RQ_KEY_PREFIX=TAG)
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_redis_cluster", *map(str, cluster.ports)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the cluster itself


def test_the_cluster_refuses_one_script_or_transaction_over_two_slots(empty: LocalCluster):
    """The spec: multi-key operations only where every key hashes to the same slot. A node
    refuses two slots in one EVAL, one MULTI or one BLPOP even when it serves both slots."""
    first = "doorbell:high"
    second = next(f"doorbell:q{n}" for n in range(10_000) if sibling(empty, first, f"doorbell:q{n}"))
    client = empty.node(empty.owner(first))
    with pytest.raises(ClusterCrossSlotError):
        client.eval("return 1", 2, first, second)
    with pytest.raises(ClusterCrossSlotError), client.pipeline(transaction=True) as pipe:
        pipe.lpush(first, 1).lpush(second, 1).execute()
    with pytest.raises(ClusterCrossSlotError):  # an idle worker waits on its queues' wake-up lists
        client.blpop([first, second], timeout=1)
    client.close()

    # One hash tag: one slot, and all three work.
    first, second = "{q}doorbell:high", "{q}doorbell:low"
    client = empty.node(empty.owner(first))
    assert client.eval("return #KEYS", 2, first, second) == 2
    with client.pipeline(transaction=True) as pipe:
        assert pipe.lpush(first, 1).lpush(second, 1).execute() == [1, 1]
    assert client.blpop([first, second], timeout=1)[0] == first.encode()
    client.close()


def test_redis_py_cluster_transactions_need_asking_and_one_slot(empty: LocalCluster):
    """redis-py's RedisCluster runs WATCH/MULTI/EXEC only when asked (transaction=True) and
    only within one slot; its default pipeline batches commands per node, with no MULTI."""
    client = empty.cluster_client()
    try:
        with client.pipeline(transaction=True) as pipe:
            pipe.watch("{t}count")
            pipe.multi()
            pipe.incr("{t}count").incr("{t}other")
            assert pipe.execute() == [1, 1]
        assert "exec" in commands(empty.owner("{t}count"))

        with pytest.raises(CrossSlotTransactionError), client.pipeline(transaction=True) as pipe:
            pipe.incr("count").incr("other").execute()
        assert key_slot(b"count") != key_slot(b"other")

        reset(empty.ports)
        with client.pipeline() as pipe:  # what RQ asks for everywhere
            assert pipe.incr("count").incr("other").execute() == [1, 1]
        assert not any({"multi", "exec"} & commands(port) for port in empty.ports)
        # Afterward queues its Lua scripts (fair share, quotas) on pipelines: not on these.
        with pytest.raises(TypeError, match="eval"), client.pipeline(transaction=True) as pipe:
            pipe.eval("return 1", 1, "{t}count")
    finally:
        client.close()


# ---------------------------------------------------------------- RQ


def test_without_a_hash_tag_rqs_keys_spread_over_the_primaries(empty: LocalCluster):
    """The baseline a cluster is for: RQ's default `rq:` keys hash all over the slots."""
    client = empty.cluster_client()
    try:
        enqueue_jobs(client)
        holding = [port for port in empty.ports if dbsize(port)]
        assert len(holding) >= 2, holding
    finally:
        client.close()


def test_a_hash_tag_puts_all_of_rqs_work_on_one_primary(cluster: LocalCluster, tagged: dict[str, Any]):
    """With RQ_KEY_PREFIX={rq}, one primary holds every key and serves every command on a key:
    the other two idle, so the cluster carries no more than that one primary would alone."""
    owner = str(cluster.owner(TAG))
    assert {port for port, count in tagged["keys"].items() if count} == {owner}
    assert tagged["keys"][owner] >= JOBS
    assert {"hset", "rpush"} <= set(tagged["commands"][owner])
    for port, served in tagged["commands"].items():
        if port != owner:
            assert set(served) <= NO_KEY_COMMANDS, (port, served)


def test_rq_on_the_cluster_client_loses_its_transactions(tagged: dict[str, Any]):
    """Even in one slot RQ cannot use RedisCluster: its workers do not start (rq/rq#2021), and
    its pipelines leave `transaction` to the client's default, which RedisCluster takes as
    none: enqueueing sends no MULTI, and the WATCH of a job with a dependency is refused."""
    assert "'RedisCluster' object has no attribute 'connection_pool'" in tagged["worker"]
    everywhere = set().union(*tagged["commands"].values())
    assert not {"multi", "exec"} & everywhere, everywhere
    # The same enqueue on a plain client of that primary is one MULTI/EXEC: the check above sees it.
    assert {"multi", "exec"} <= set(tagged["plain_enqueue_commands"])
    assert "watch() is not supported outside of transactional context" in tagged["enqueue_with_dependency"]


# ---------------------------------------------------------------- Afterward


def test_afterwards_scripts_mix_its_keys_with_rqs_even_with_the_prefix(tagged: dict[str, Any]):
    """The prefix moves RQ's keys only: Afterward's `afterward:` keys hash elsewhere, and its
    submission, its take of a job and its webhooks each touch both in one script."""
    assert tagged["afterward_enqueue"].startswith("ClusterCrossSlotError"), tagged["afterward_enqueue"]
    assert tagged["afterward_dequeue"].startswith("ClusterCrossSlotError"), tagged["afterward_dequeue"]
    # On RedisCluster the submission stops sooner: its pipelines cannot hold a script at all.
    assert "eval" in tagged["afterward_enqueue_on_cluster_client"], tagged[
        "afterward_enqueue_on_cluster_client"
    ]
    for name, group in tagged["key_groups"].items():
        assert len({key_slot(key.encode()) for key in group}) > 1, (name, group)


def test_afterwards_own_scripts_span_slots(empty: LocalCluster):
    """Afterward's own multi-key scripts (a key's quota, the document index) cross slots too."""
    owner = "alice"
    client = empty.node(empty.owner(keys.waiting(owner)))
    with pytest.raises(ClusterCrossSlotError), client.pipeline(transaction=False) as pipe:
        quota.reserve(pipe, owner, "job-1", 100, now=0, lapses_at=60, jobs=10, size_limit=2**20)
        pipe.execute()
    client.close()
    client = empty.node(empty.owner(keys.INDEX_REVISIONS))
    with pytest.raises(ClusterCrossSlotError):
        DocumentStore(client).delete("doc-1")
    client.close()


# ---------------------------------------------------------------- helpers


def sibling(cluster: LocalCluster, key: str, other: str) -> bool:
    """True when `other` is served by the node serving `key`, in another slot."""
    return cluster.owner(other) == cluster.owner(key) and key_slot(other.encode()) != key_slot(key.encode())


def reset(ports: list[int]) -> None:
    """Empty every node and zero its command counts."""
    for port in ports:
        client = LocalCluster.node(port)
        client.flushall()
        client.config_resetstat()
        client.close()


def commands(port: int) -> set[str]:
    """The commands the node on `port` ran since its counts were reset (Redis 7 counts
    subcommands apart, as "config|resetstat": counted here as their command)."""
    client = LocalCluster.node(port)
    try:
        return {name.removeprefix("cmdstat_").split("|")[0] for name in client.info("commandstats")}
    finally:
        client.close()


def dbsize(port: int) -> int:
    client = LocalCluster.node(port)
    try:
        return int(client.dbsize())
    finally:
        client.close()


def enqueue_jobs(client: redis.Redis | redis.RedisCluster) -> None:
    for number in range(JOBS):
        RQQueue(QUEUES[number % len(QUEUES)], connection=client).enqueue("os.getpid")


def outcome(action: Callable[[], Any]) -> str:
    """What `action` raised, as "Type: message"; "ok" when it raised nothing."""
    try:
        action()
    except Exception as error:  # the error is the observation
        return f"{type(error).__name__}: {error}"
    return "ok"


def observe(ports: list[int]) -> dict[str, Any]:
    """Run in a process where RQ_KEY_PREFIX is `{rq}`: RQ and Afterward on the cluster."""
    from jobs.engine import fair
    from jobs.engine.job import Job
    from jobs.engine.queue import Queue

    client = redis.RedisCluster(host="127.0.0.1", port=ports[0], socket_timeout=10)
    owner = client.get_node_from_key(TAG).port
    plain = LocalCluster.node(owner)
    seen: dict[str, Any] = {}

    reset(ports)
    enqueue_jobs(client)
    seen["keys"] = {str(port): dbsize(port) for port in ports}
    seen["commands"] = {str(port): sorted(commands(port)) for port in ports}
    first = RQQueue(QUEUES[0], connection=client).get_job_ids()[0]
    seen["worker"] = outcome(lambda: RQWorker([RQQueue(connection=client)], connection=client))
    seen["enqueue_with_dependency"] = outcome(
        lambda: RQQueue(connection=client).enqueue("os.getpid", depends_on=first)
    )
    reset(ports)
    RQQueue(connection=plain).enqueue("os.getpid")
    seen["plain_enqueue_commands"] = sorted(commands(owner))

    reset(ports)
    queue = Queue("default", connection=plain)
    seen["afterward_enqueue"] = outcome(lambda: queue.enqueue("os.getpid"))
    seen["afterward_dequeue"] = outcome(lambda: Queue.dequeue_any([queue], None, connection=plain))
    seen["afterward_enqueue_on_cluster_client"] = outcome(
        lambda: Queue("default", connection=client).enqueue("os.getpid")
    )
    seen["key_groups"] = {
        "fair share (admit, forget, repair)": fair.queue_keys("default"),
        "take a job": fair.take_keys(queue, queue.started_job_registry.key),
        "record a webhook": [Job.key_for("job-1"), keys.CALLBACKS],
    }
    client.close()
    plain.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(observe([int(port) for port in sys.argv[1:]])))
