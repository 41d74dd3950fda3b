"""REDIS_MIN_REPLICAS on fakeredis: settings, which routes wait, and the 503 they answer.

fakeredis has no WAIT, so `Pin.confirm` is replaced here; tests/test_replicated_writes.py
runs the real thing against a primary and a replica.
"""

from __future__ import annotations

import pytest
import redis

from jobs import keys
from jobs.engine.job import Job
from jobs.replication import NotReplicated, Pin, PinnedPool, pinnable, pinned
from jobs.settings import MAX_REPLICA_TIMEOUT_MS, Settings
from service.state import get_state
from tests.support import ROOT
from tests.test_api import assert_error, post
from tests.test_security import make_app

# Write routes whose answers acknowledge nothing: a search only spends the key's budget.
READS_BY_POST = {"search.search_post"}


@pytest.fixture
def replicated(fake_redis, tmp_path):
    return make_app(
        tmp_path, redis_min_replicas=1, redis_replica_timeout_ms=700, rate_limit="off"
    ).test_client()


def never_confirmed(pin: Pin, replicas: int, timeout_ms: int) -> int:
    """A confirmation as a stopped replica makes it: WAIT answers 0."""
    raise NotReplicated(replicas, 0, f"0 of {replicas} replicas confirmed")


@pytest.fixture
def unconfirmed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every confirmation fails; yields the replica counts asked for."""
    asked: list[int] = []

    def confirm(pin: Pin, replicas: int, timeout_ms: int) -> int:
        asked.append(replicas)
        return never_confirmed(pin, replicas, timeout_ms)

    monkeypatch.setattr(Pin, "confirm", confirm)
    return asked


@pytest.fixture
def confirmed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    asked: list[int] = []

    def confirm(pin: Pin, replicas: int, timeout_ms: int) -> int:
        asked.append(replicas)
        return replicas

    monkeypatch.setattr(Pin, "confirm", confirm)
    return asked


# ---------------------------------------------------------------- settings


def test_settings_default_to_answering_once_the_primary_has_the_write():
    settings = Settings.from_env({})
    assert settings.redis_min_replicas == 0
    assert settings.redis_replica_timeout_ms == 1000


def test_settings_are_read_from_the_environment():
    settings = Settings.from_env({"REDIS_MIN_REPLICAS": "2", "REDIS_REPLICA_TIMEOUT_MS": "250"})
    assert (settings.redis_min_replicas, settings.redis_replica_timeout_ms) == (2, 250)


@pytest.mark.parametrize(
    ("name", "raw", "says"),
    [
        ("REDIS_MIN_REPLICAS", "-1", "must not be negative"),
        ("REDIS_MIN_REPLICAS", "one", "must be an integer"),
        # 0 is WAIT's "forever"; longer than the web client's socket timeout would be cut off.
        ("REDIS_REPLICA_TIMEOUT_MS", "0", "must be 1 to"),
        ("REDIS_REPLICA_TIMEOUT_MS", str(MAX_REPLICA_TIMEOUT_MS + 1), "must be 1 to"),
        ("REDIS_REPLICA_TIMEOUT_MS", "1.5", "must be an integer"),
    ],
)
def test_bad_settings_are_refused_by_name(name, raw, says):
    with pytest.raises(ValueError, match=says) as refused:
        Settings.from_env({name: raw})
    assert name in str(refused.value)


def test_the_settings_are_documented():
    readme = (ROOT / "docs" / "configuration.md").read_text()
    for name in ("REDIS_MIN_REPLICAS", "REDIS_REPLICA_TIMEOUT_MS"):
        assert f"| `{name}` |" in readme


# ---------------------------------------------------------------- which answers wait


def test_every_route_that_writes_waits_for_replicas(replicated):
    app = replicated.application
    writes = {
        rule.endpoint
        for rule in app.url_map.iter_rules()
        if rule.methods & {"POST", "PUT", "PATCH", "DELETE"} and rule.endpoint not in READS_BY_POST
    }
    assert {"jobs.create_job", "jobs.cancel_job", "jobs.retry_job", "jobs.retry_jobs"} <= writes
    assert "search.delete_document" in writes and "rq_dashboard.requeue_job_view" in writes
    waiting = {
        endpoint for endpoint in writes if getattr(app.view_functions[endpoint], "acknowledges_writes", 0)
    }
    assert waiting == writes


def test_without_min_replicas_nothing_is_pinned_or_waited_for(client, unconfirmed):
    assert post(client, "log", {"message": "x"}).status_code == 202
    assert unconfirmed == []
    with client.application.app_context():
        assert not isinstance(get_state().redis.connection_pool, PinnedPool)


# ---------------------------------------------------------------- the 503


def test_an_unconfirmed_submission_answers_503_not_replicated(replicated, unconfirmed, fake_redis):
    response = post(replicated, "log", {"message": "x"}, headers={"Idempotency-Key": "k-1"})
    error = assert_error(response, 503, "not_replicated")
    assert response.headers["Retry-After"].isdigit() and int(response.headers["Retry-After"]) > 0
    assert error["details"] == {"replicas_required": 1, "replicas_confirmed": 0}
    assert "may or may not have been applied" in error["message"]
    assert "same Idempotency-Key" in error["message"] and "700 ms" in error["message"]
    assert unconfirmed == [1]
    # The primary has it: an unconfirmed write is unknown, not undone.
    assert fake_redis.zcard(keys.recent_jobs("public")) == 1


def test_a_retry_with_the_same_key_after_a_503_gets_the_one_job(replicated, monkeypatch, fake_redis):
    def fail(pin: Pin, replicas: int, timeout_ms: int) -> int:
        raise NotReplicated(replicas, None, "Redis failed while confirming it")

    monkeypatch.setattr(Pin, "confirm", fail)
    headers = {"Idempotency-Key": "k-2"}
    assert_error(post(replicated, "log", {"message": "once"}, headers=headers), 503, "not_replicated")
    asked = []
    monkeypatch.setattr(Pin, "confirm", lambda pin, replicas, timeout_ms: asked.append(replicas) or replicas)
    again = post(replicated, "log", {"message": "once"}, headers=headers)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert asked == [1], "the repeat waits for replicas too: it acknowledges the earlier write"
    (only,) = fake_redis.zrange(keys.recent_jobs("public"), 0, -1)
    assert again.get_json()["id"] == only.decode()


def test_confirmed_writes_answer_as_usual(replicated, confirmed):
    view = post(replicated, "log", {"message": "later", "delay": 60}).get_json()
    assert replicated.delete(f"/jobs/{view['id']}").get_json()["status"] == "canceled"
    assert replicated.post("/jobs/retry", json={}).status_code == 200  # nothing failed: nothing queued
    assert confirmed == [1, 1, 1]


def test_an_unconfirmed_cancel_answers_503_and_was_applied(replicated, confirmed, monkeypatch, fake_redis):
    view = post(replicated, "log", {"message": "later", "delay": 60}).get_json()
    monkeypatch.setattr(Pin, "confirm", never_confirmed)
    assert_error(replicated.delete(f"/jobs/{view['id']}"), 503, "not_replicated")
    assert Job.fetch(view["id"], connection=fake_redis).get_status() == "canceled"
    # Repeated, it finds its work done.
    assert_error(replicated.delete(f"/jobs/{view['id']}"), 409, "conflict")


def test_errors_do_not_wait(replicated, unconfirmed):
    assert_error(post(replicated, "log", {"message": ""}), 422)
    assert_error(replicated.delete("/jobs/" + "0" * 32), 404)
    assert unconfirmed == []


# ---------------------------------------------------------------- Redis refusing writes


def test_a_primary_refusing_writes_for_want_of_replicas_answers_503(client, monkeypatch):
    def refuse(*args, **kwargs):
        raise redis.exceptions.ResponseError(
            "Command # 1 (SET x 1) of pipeline caused error: NOREPLICAS Not enough good replicas to write."
        )

    monkeypatch.setattr(Job, "fetch", refuse)
    response = client.delete("/jobs/" + "0" * 32)
    error = assert_error(response, 503, "not_replicated")
    assert "min-replicas-to-write" in error["message"] and response.headers["Retry-After"]


@pytest.mark.parametrize(
    "message",
    [
        "READONLY You can't write against a read only replica.",
        "Command # 2 (LPUSH q 1) of pipeline caused error: "
        "READONLY You can't write against a read only replica.",
    ],
)
def test_a_primary_demoted_to_a_replica_answers_503_unavailable(client, monkeypatch, message):
    """A failover behind a DNS name leaves connections on the old primary, now a replica."""

    def demoted(*args, **kwargs):
        raise redis.exceptions.ReadOnlyError(message)

    monkeypatch.setattr(Job, "fetch", demoted)
    response = client.delete("/jobs/" + "0" * 32)
    assert_error(response, 503, "redis_unavailable")
    assert response.headers["Retry-After"]


def test_other_redis_errors_stay_internal_errors(client, monkeypatch):
    def broken(*args, **kwargs):
        raise redis.exceptions.ResponseError(
            "WRONGTYPE Operation against a key holding the wrong kind of value"
        )

    monkeypatch.setattr(Job, "fetch", broken)
    error = assert_error(client.delete("/jobs/" + "0" * 32), 500, "internal_error")
    assert "WRONGTYPE" not in error["message"]


# ---------------------------------------------------------------- the pinned connection


def test_a_connection_that_reconnected_is_never_confirmed(fake_redis):
    client = pinnable(fake_redis)
    with pinned(client) as pin:
        client.set("written", 1)
        pin.connection.disconnect()  # the socket the write went on is gone
        assert client.get("written") == b"1"  # a new socket, perhaps to another primary
        with pytest.raises(NotReplicated, match="lost"):
            pin.confirm(1, 100)


def test_a_pin_confirms_only_inside_its_block(fake_redis):
    client = pinnable(fake_redis)
    with pinned(client) as pin:
        pass
    with pytest.raises(RuntimeError):
        pin.confirm(1, 100)
