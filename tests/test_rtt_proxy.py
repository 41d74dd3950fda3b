"""bench.rtt_proxy adds the round trip it is given, once per request or pipeline, and loses no byte."""

from __future__ import annotations

import os
import statistics
import time
from urllib.parse import urlsplit

import pytest
import redis

from bench.rtt_proxy import RttProxy
from scripts import stack

pytestmark = pytest.mark.integration


def proxy(test_db: stack.TestDatabase, rtt_ms: float) -> RttProxy:
    target = urlsplit(test_db.url)
    return RttProxy.with_rtt(target.port or 6379, rtt_ms, target_host=target.hostname or "127.0.0.1")


def round_trip(client: redis.Redis, samples: int = 40) -> float:
    """The median time of a PING, in milliseconds."""
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def pipeline_time(client: redis.Redis, commands: int = 50, samples: int = 10) -> float:
    """The median time of a pipeline of `commands` PINGs, in milliseconds."""
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        with client.pipeline(transaction=False) as pipe:
            for _ in range(commands):
                pipe.ping()
            assert pipe.execute() == [True] * commands
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def test_a_round_trip_grows_by_the_rtt_and_a_pipeline_costs_one(test_db: stack.TestDatabase):
    measured = {}
    for rtt in (0, 10, 20):
        with proxy(test_db, rtt) as through:
            client = redis.Redis.from_url(through.url(test_db.url))
            client.ping()  # the connection's handshake round trip is paid here
            measured[rtt] = (round_trip(client), pipeline_time(client))
            client.close()
    (zero, zero_pipe), (ten, ten_pipe), (twenty, twenty_pipe) = measured[0], measured[10], measured[20]
    # Each RTT's round trip is the direct one plus at least that RTT, and not much more
    # (generous slack: the machine may be busy, but 50 round trips would be far above it).
    assert 10 <= ten < zero + 10 + 8, measured
    assert 20 <= twenty < zero + 20 + 8, measured
    assert 10 - 8 < twenty - ten < 10 + 8, measured
    # Fifty pipelined commands are held once, from their arrival: one RTT, not fifty.
    assert 20 <= twenty_pipe < zero_pipe + 2 * 20, measured
    assert 10 <= ten_pipe < zero_pipe + 2 * 10, measured


def test_a_new_connection_pays_the_handshake_round_trip(test_db: stack.TestDatabase):
    with proxy(test_db, 20) as through:
        client = redis.Redis.from_url(through.url(test_db.url))
        started = time.perf_counter()
        client.ping()
        first = (time.perf_counter() - started) * 1000
        second = round_trip(client, samples=5)
        client.close()
    assert first >= 2 * 20 and second < first, (first, second)


def test_bytes_arrive_whole_and_in_order(test_db: stack.TestDatabase):
    value = os.urandom(3 * 2**20)  # larger than any socket buffer: flow control has to work
    with proxy(test_db, 2) as through:
        client = redis.Redis.from_url(through.url(test_db.url))
        try:
            with client.pipeline(transaction=False) as pipe:
                for i in range(200):
                    pipe.rpush("rtt-proxy:order", i)
                pipe.set("rtt-proxy:big", value)
                pipe.get("rtt-proxy:big")
                pipe.lrange("rtt-proxy:order", 0, -1)
                *_, written, echoed, order = pipe.execute()
            assert written is True
            assert echoed == value
            assert order == [str(i).encode() for i in range(200)]
        finally:
            client.delete("rtt-proxy:order", "rtt-proxy:big")
            client.close()


def test_the_proxy_process_ends_with_its_block(test_db: stack.TestDatabase):
    with proxy(test_db, 0) as through:
        process = through.process
        assert process is not None and process.alive()
        assert redis.Redis.from_url(through.url(test_db.url)).ping()
    assert not process.alive()


def test_a_running_proxy_takes_a_new_rtt(test_db: stack.TestDatabase):
    with proxy(test_db, 0) as through:
        client = redis.Redis.from_url(through.url(test_db.url))
        client.ping()
        before = round_trip(client, samples=10)
        through.set_rtt(20)
        after = round_trip(client, samples=10)
        client.close()
    assert through.rtt_ms == 20
    assert after >= 20 > before, (before, after)
