"""A Redis Cluster of three primaries on loopback, for the tests that show why Afterward does
not run on one (docs/deploying.md, "Redis Cluster"; tests/test_redis_cluster.py).

Built from `EmbeddedRedis` servers with `cluster-enabled yes`, joined with CLUSTER ADDSLOTS
and CLUSTER MEET, so it needs neither `redis-cli` nor Redis 7's CLUSTER ADDSLOTSRANGE.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from scripts.embedded_redis import EmbeddedRedis, free_port

# A node's cluster bus listens on its port + 10000 (Redis 6.2 cannot choose another).
BUS_OFFSET = 10000


class LocalCluster:
    """`primaries` redis-servers sharing the 16384 hash slots in equal ranges, no replicas."""

    def __init__(self, directory: Path | str, primaries: int = 3) -> None:
        self.directory = Path(directory)
        self.primaries = primaries
        self.servers: list[EmbeddedRedis] = []

    def start(self, timeout: float = 60.0) -> LocalCluster:
        try:
            for index in range(self.primaries):
                self.servers.append(self._start_node(index))
            self._join(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, index: int) -> EmbeddedRedis:
        for _ in range(5):  # a port picked here may be taken before Redis binds it (or its bus)
            server = EmbeddedRedis(
                self.directory / f"node-{index}",
                _port_with_free_bus(),
                False,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            )
            try:
                return server.start()
            except RuntimeError:
                server.stop()
        raise RuntimeError("no cluster node started: its ports were taken five times")

    def _join(self, timeout: float) -> None:
        clients = [self.node(server.port) for server in self.servers]
        try:
            for index, client in enumerate(clients):
                low, high = self.slot_range(index)
                client.execute_command("CLUSTER", "ADDSLOTS", *range(low, high))
                # Distinct epochs before meeting: no collision to resolve, the cluster forms sooner.
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            for server in self.servers[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", server.port)
            deadline = time.monotonic() + timeout
            while not all(self._formed(client) for client in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not form within {timeout:.0f} s")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def _formed(self, client: redis.Redis) -> bool:
        info = client.cluster("info")
        return info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == self.primaries

    def slot_range(self, index: int) -> tuple[int, int]:
        """The hash slots node `index` serves: [low, high)."""
        share = REDIS_CLUSTER_HASH_SLOTS
        return index * share // self.primaries, (index + 1) * share // self.primaries

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    def owner(self, key: str) -> int:
        """The port of the node serving `key`'s hash slot."""
        slot = key_slot(key.encode())
        for index, server in enumerate(self.servers):
            low, high = self.slot_range(index)
            if low <= slot < high:
                return server.port
        raise AssertionError(f"no node serves slot {slot}")

    @staticmethod
    def node(port: int) -> redis.Redis:
        """A plain client on one node: it follows no redirection."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)

    def cluster_client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.servers[0].port, socket_timeout=10)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_with_free_bus() -> int:
    """A free port whose cluster bus port (10000 above) exists and is free too."""
    while True:
        port = free_port()
        if port + BUS_OFFSET > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        return port
