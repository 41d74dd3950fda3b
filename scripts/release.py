"""The Procfile's `release:` step: refuse to deploy onto a Redis that would lose jobs.

Checks that Redis answers, is new enough (6.2: LMOVE), and does not evict keys; exits 1
with the reason otherwise, which stops a Heroku release before any process restarts.

With REDIS_MIN_REPLICAS=N it also says which Redis settings make "acknowledged means on N
replicas" hold (`replication_checks`). Fewer than N replicas online fails the release: every
write would answer 503. The rest are warnings, since the guarantee of each answer still holds
without them (WAIT confirms it) and managed Redis may not let the operator change them:
min-replicas-to-write below N (a primary cut off from its replicas goes on taking writes that
a failover then drops, each answered 503 but applied meanwhile), the append-only file off on
the primary or a replica (a restarted node comes back empty, and a restarted primary's
replicas copy its empty data set), and a replica that may evict keys once promoted.
"""

from __future__ import annotations

import sys

import redis

from jobs import sentinel
from jobs.connection import connect, eviction_policy
from jobs.settings import Settings, get_settings

MINIMUM_VERSION = (6, 2)
# Seconds the check waits for a replica it connects to (it may be unreachable from here).
REPLICA_TIMEOUT = 3


def main() -> int:
    settings = get_settings()
    connection = connect(settings, role="tool")
    try:
        version = connection.info("server")["redis_version"]
    except redis.exceptions.RedisError as error:
        print(
            f"release: Redis does not answer at REDIS_URL ({type(error).__name__}: {error})", file=sys.stderr
        )
        return 1
    problems = []
    if tuple(int(part) for part in str(version).split(".")[:2]) < MINIMUM_VERSION:
        problems.append(
            f"Redis {version} is too old: Afterward needs {'.'.join(map(str, MINIMUM_VERSION))} or newer."
        )
    policy = eviction_policy(connection)
    if policy not in (None, "noeviction"):
        problems.append(
            f"Redis maxmemory-policy is {policy!r}: it would delete queued jobs under memory pressure. "
            "Set it to noeviction (Heroku: heroku redis:maxmemory --policy noeviction)."
        )
    warnings: list[str] = []
    replication = ""
    if settings.redis_min_replicas:
        more_problems, warnings, replication = replication_checks(connection, settings)
        problems += more_problems
    for problem in problems:
        print(f"release: {problem}", file=sys.stderr)
    for warning in warnings:
        print(f"release: warning: {warning}", file=sys.stderr)
    if not problems:
        print(f"release: Redis {version}, maxmemory-policy {policy or 'unknown'}{replication}: ready")
    return 1 if problems else 0


def replication_checks(connection: redis.Redis, settings: Settings) -> tuple[list[str], list[str], str]:
    """What stands between REDIS_MIN_REPLICAS and its guarantee: problems (the release fails),
    warnings, and a few words for the ready line."""
    required = settings.redis_min_replicas
    try:
        info = connection.info("replication")
    except redis.exceptions.ResponseError:  # INFO refused
        return [], [f"INFO replication is refused: cannot tell whether {required} replica(s) are online."], ""
    role = info.get("role")
    if role != "master":
        return [f"REDIS_URL names a replica (role {role}), not the primary: it takes no writes."], [], ""
    online = online_replicas(info)
    problems, warnings = [], []
    if len(online) < required:
        problems.append(
            f"REDIS_MIN_REPLICAS is {required} but the primary has {len(online)} replica(s) online "
            "(INFO replication): every write would answer 503 not_replicated. Connect the replicas "
            "or lower REDIS_MIN_REPLICAS."
        )
    warnings += _min_replicas_to_write(connection, info, required)
    if append_only(connection) is False:
        warnings.append(
            "appendonly is off on the primary: restarted, it comes back empty and its replicas copy "
            "the empty data set. Set appendonly yes."
        )
    for host, port in online:
        warnings += _check_replica(connection, host, port)
    if sentinel.is_sentinel_url(settings.redis_url) and len(online) >= required:
        warnings += failover_checks(connection, settings, len(online))
    return problems, warnings, f", {len(online)} replica(s) online (REDIS_MIN_REPLICAS {required})"


def sentinels_down_after(target: sentinel.SentinelTarget) -> int:
    """down-after-milliseconds, as the first Sentinel that answers has it."""
    for client in sentinel.WATCH.primary(target).sentinel.sentinels:
        try:
            return int(client.sentinel_master(target.service_name)["down-after-milliseconds"])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            continue
    raise redis.exceptions.ConnectionError("no Sentinel answers")


def failover_checks(connection: redis.Redis, settings: Settings, online: int) -> list[str]:
    """Behind Sentinel: whether a failover leaves enough replicas to confirm writes, and whether
    a partitioned primary stops taking writes before the Sentinels promote a replica."""
    required = settings.redis_min_replicas
    warnings = []
    if online < required + 1:
        warnings.append(
            f"{online} replica(s) for REDIS_MIN_REPLICAS {required}: a failover promotes one and "
            f"leaves {online - 1}, so writes answer 503 until the failed node is back. Run "
            f"{required + 1} replicas to go on taking writes through a failover."
        )
    target = sentinel.parse(settings.redis_client_url).target
    try:
        lag = int(connection.config_get("min-replicas-max-lag").get("min-replicas-max-lag", 10))
        down_after = sentinels_down_after(target)
    except (redis.exceptions.RedisError, KeyError, ValueError):
        return [*warnings, "cannot compare min-replicas-max-lag with the Sentinels' down-after-milliseconds."]
    if lag * 1000 >= down_after:
        warnings.append(
            f"min-replicas-max-lag ({lag} s) is not below the Sentinels' down-after-milliseconds "
            f"({down_after} ms): a partitioned primary goes on taking writes after the Sentinels "
            "have promoted a replica, and a partition that heals then loses them. Lower it."
        )
    return warnings


def online_replicas(info: dict) -> list[tuple[str, int]]:
    """Address of each replica the primary streams to (INFO replication's `slaveN`, `online`)."""
    return [
        (str(entry["ip"]), int(entry["port"]))
        for name, entry in sorted(info.items())
        if name.startswith("slave") and isinstance(entry, dict) and entry.get("state") == "online"
    ]


def append_only(connection: redis.Redis) -> bool | None:
    """Whether the append-only file is on (INFO persistence: managed Redis often refuses CONFIG)."""
    try:
        return bool(int(connection.info("persistence")["aof_enabled"]))
    except (redis.exceptions.ResponseError, KeyError, ValueError):
        return None


def _min_replicas_to_write(connection: redis.Redis, info: dict, required: int) -> list[str]:
    advice = (
        f"set it to at least {required} (CONFIG SET min-replicas-to-write {required}, and in the "
        "configuration file) so that a primary cut off from its replicas stops taking writes a "
        "failover would drop"
    )
    try:
        value = int(connection.config_get("min-replicas-to-write").get("min-replicas-to-write", 0))
    except redis.exceptions.ResponseError:  # CONFIG refused (managed Redis): INFO shows whether it is on
        if "min_slaves_good_slaves" in info:
            return [f"CONFIG is refused, so min-replicas-to-write cannot be read (it is on): {advice}."]
        return [f"min-replicas-to-write is off (INFO replication; CONFIG is refused): {advice}."]
    if value < required:
        return [f"min-replicas-to-write is {value}: {advice}."]
    return []


def _check_replica(connection: redis.Redis, host: str, port: int) -> list[str]:
    """Warnings about one replica, reached as the primary sees it, with REDIS_URL's credentials."""
    pool = connection.connection_pool
    # Not where the primary is (a unix socket, the Sentinels): where INFO says the replica is.
    kwargs = {key: value for key, value in pool.connection_kwargs.items() if key not in ("path", "sentinel")}
    kwargs.update(
        host=host, port=port, socket_timeout=REPLICA_TIMEOUT, socket_connect_timeout=REPLICA_TIMEOUT
    )
    tls = issubclass(pool.connection_class, redis.SSLConnection)
    replica = redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=redis.SSLConnection if tls else redis.Connection, **kwargs
        )
    )
    try:
        aof, policy = append_only(replica), eviction_policy(replica)
    except redis.exceptions.RedisError as error:
        return [
            f"cannot reach the replica at {host}:{port} ({type(error).__name__}) to check it: make sure "
            "it runs with appendonly yes and maxmemory-policy noeviction."
        ]
    finally:
        replica.connection_pool.disconnect()
    warnings = []
    if aof is False:
        warnings.append(f"appendonly is off on the replica at {host}:{port}: set appendonly yes.")
    if policy not in (None, "noeviction"):
        warnings.append(
            f"the replica at {host}:{port} has maxmemory-policy {policy!r}: promoted, it would evict "
            "jobs. Set noeviction."
        )
    return warnings


if __name__ == "__main__":
    sys.exit(main())
