"""The private Redis `make run` and the tests start when none answers."""

from __future__ import annotations

import redis

from scripts.embedded_redis import EmbeddedRedis, answers


def test_embedded_redis_keeps_data_in_its_append_only_file(tmp_path):
    with EmbeddedRedis(tmp_path / "redis") as server:
        assert answers(server.url)
        client = redis.Redis.from_url(server.url)
        client.set("kept", "yes")
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()
    assert not answers(server.url)
    assert list((tmp_path / "redis").rglob("*.aof*")), "no append-only file was written"
    with EmbeddedRedis(tmp_path / "redis", port=server.port) as again:
        assert redis.Redis.from_url(again.url).get("kept") == b"yes"
