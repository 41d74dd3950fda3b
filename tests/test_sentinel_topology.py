"""The Sentinel topology the failover tests and benchmark stand on: it replicates, fails over and heals."""

from __future__ import annotations

import socket

import pytest

from scripts.sentinel import Node, SentinelTopology

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def test_a_killed_primary_is_replaced_and_comes_back_as_a_replica(tmp_path):
    with SentinelTopology(tmp_path) as topology:
        assert topology.url.startswith("redis+sentinel://127.0.0.1:")
        assert topology.url.endswith("/afterward")
        primary, replica = topology.primary(), topology.replica()
        assert primary is not replica
        assert primary.role() == "master" and replica.role() == "slave"

        writer = primary.client()
        writer.set("written", "before the kill")
        assert writer.wait(1, 5000) == 1, "the replica did not acknowledge the write"
        assert replica.client().get("written") == b"before the kill"

        old = topology.kill_primary()
        assert old is primary and not old.alive()
        new = topology.wait_for_failover(old, timeout=30)
        assert new is replica
        assert new.role() == "master"
        assert new.client().get("written") == b"before the kill"
        new.client().set("written", "after the failover")

        topology.restart(old)
        assert old.alive() and old.role() == "slave"
        assert old.client().get("written") == b"after the failover"
        assert topology.primary() is new and topology.replica() is old


def test_a_paused_primary_is_failed_over_and_demoted_when_it_resumes(tmp_path):
    with SentinelTopology(tmp_path) as topology:
        old = topology.stop_primary()
        new = topology.wait_for_failover(old, timeout=30)
        assert new is not old
        topology.cont(old)
        topology.wait_replica(old, timeout=60)
        assert old.role() == "slave"
        assert topology.primary() is new


def test_a_node_whose_port_was_taken_before_its_first_start_moves_to_a_free_one(tmp_path):
    node = Node("redis-a", tmp_path / "a")
    taken = socket.socket()
    taken.bind(("127.0.0.1", node.port))
    taken.listen()
    try:
        node.launch(['save ""'])
        assert node.port != taken.getsockname()[1] and node.client().ping()
    finally:
        node.stop()
        taken.close()
