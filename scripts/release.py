"""The Procfile's `release:` step: refuse to deploy onto a Redis that would lose jobs.

Checks that Redis answers, is new enough (6.2: LMOVE), and does not evict keys; exits 1
with the reason otherwise, which stops a Heroku release before any process restarts.
"""

from __future__ import annotations

import sys

import redis

from jobs.connection import connect, eviction_policy
from jobs.settings import get_settings

MINIMUM_VERSION = (6, 2)


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
    for problem in problems:
        print(f"release: {problem}", file=sys.stderr)
    if not problems:
        print(f"release: Redis {version}, maxmemory-policy {policy or 'unknown'}: ready")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
