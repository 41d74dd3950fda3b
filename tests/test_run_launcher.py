"""`make run` chooses its Redis and says which, never printing a password."""

from __future__ import annotations

import redis

from scripts.embedded_redis import EmbeddedRedis, free_port
from scripts.run import choose_redis


def test_a_given_redis_url_is_used_and_printed_without_its_password(tmp_path):
    env = {"REDIS_URL": "redis://:s3cret@cache.internal:6380/2"}
    embedded, message = choose_redis(env, "redis://127.0.0.1:1/0", tmp_path)
    assert embedded is None
    assert env["REDIS_URL"] == "redis://:s3cret@cache.internal:6380/2"
    assert "redis://:***@cache.internal:6380/2" in message and "s3cret" not in message


def test_a_redis_already_running_is_used_and_called_so(tmp_path):
    with EmbeddedRedis(tmp_path / "theirs", appendonly=False) as theirs:
        env: dict[str, str] = {}
        embedded, message = choose_redis(env, theirs.url, tmp_path / "ours")
        assert embedded is None
        assert env["REDIS_URL"] == theirs.url
        assert "already running" in message and "not one started by make run" in message
        assert not (tmp_path / "ours").exists()


def test_without_any_redis_a_private_one_starts(tmp_path):
    env: dict[str, str] = {}
    embedded, message = choose_redis(env, f"redis://127.0.0.1:{free_port()}/0", tmp_path / "ours")
    assert embedded is not None
    try:
        assert env["REDIS_URL"] == embedded.url
        assert "started a private Redis" in message
        assert redis.Redis.from_url(env["REDIS_URL"]).ping()
    finally:
        embedded.stop()
