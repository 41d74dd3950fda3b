"""When a schedule ticks (cron in a timezone, across DST changes; every N seconds), and what
`POST /schedules` refuses: fast tests, on fakeredis. The ticking itself: tests/test_schedules.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from jobs.schedules import MAX_EVERY, Timing, check_cron
from service.security import key_owner
from tests.test_security import KEY_A, KEY_B, make_app


def at(text: str) -> float:
    """Unix time of an ISO 8601 UTC time."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


def ticks(timing: Timing, start: str, count: int) -> list[str]:
    found, moment = [], at(start)
    for _ in range(count):
        moment = timing.first_after(moment)
        found.append(utc(moment))
    return found


def test_cron_is_read_in_its_timezone():
    berlin = Timing(cron="0 9 * * 1-5", timezone="Europe/Berlin")
    # Friday 2026-01-09: 09:00 in Berlin is 08:00 UTC (CET, +1); the next is Monday's.
    assert ticks(berlin, "2026-01-09T07:00:00", 2) == ["2026-01-09 08:00", "2026-01-12 08:00"]
    summer = ticks(berlin, "2026-07-01T00:00:00", 1)
    assert summer == ["2026-07-01 07:00"]  # CEST, +2
    assert ticks(Timing(cron="*/5 * * * *"), "2026-01-01T00:07:30", 3) == [
        "2026-01-01 00:10",
        "2026-01-01 00:15",
        "2026-01-01 00:20",
    ]


def test_a_daily_time_the_clocks_skip_runs_right_after_the_gap():
    # Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
    daily = Timing(cron="30 2 * * *", timezone="Europe/Berlin")
    assert ticks(daily, "2026-03-28T12:00:00", 3) == [
        "2026-03-29 01:00",  # 03:00 CEST, the first instant after the gap
        "2026-03-30 00:30",  # 02:30 CEST
        "2026-03-31 00:30",
    ]


def test_a_daily_time_the_clocks_repeat_runs_once():
    # Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice that day.
    daily = Timing(cron="30 2 * * *", timezone="Europe/Berlin")
    assert ticks(daily, "2026-10-24T12:00:00", 3) == [
        "2026-10-25 00:30",  # 02:30 CEST, the first 02:30; not 01:30 UTC, the second
        "2026-10-26 01:30",  # 02:30 CET
        "2026-10-27 01:30",
    ]
    hourly = Timing(cron="0 * * * *", timezone="Europe/Berlin")
    # Local 01:00, 02:00 (CEST), then 03:00 (CET): the repeated 02:00 CET does not run again.
    assert ticks(hourly, "2026-10-24T22:30:00", 3) == [
        "2026-10-24 23:00",
        "2026-10-25 00:00",
        "2026-10-25 02:00",
    ]


def test_every_keeps_its_rhythm_and_skips_what_was_missed():
    every = Timing(every=10)
    assert every.first_after(1000.0) == 1010.0
    assert every.following(1010.0, 1010.2) == 1020.0  # claimed on time
    assert every.following(1010.0, 1019.9) == 1020.0  # claimed late, still before the next
    # Claimed 50 intervals late: one job for them all, then the first tick after now, on the rhythm.
    assert every.following(1010.0, 1513.0) == 1520.0
    assert Timing(every=MAX_EVERY).first_after(0.0) == MAX_EVERY


def test_cron_after_a_long_outage_goes_on_from_now():
    cron = Timing(cron="*/5 * * * *")
    due = at("2026-01-01T00:05:00")
    assert utc(cron.following(due, at("2026-01-01T03:07:00"))) == "2026-01-01 03:10"


@pytest.mark.parametrize(
    "expression", ["", "* * * *", "* * * * * *", "61 * * * *", "@reboot", "@often", "x" * 101]
)
def test_cron_expressions_we_do_not_run(expression):
    with pytest.raises(ValueError):
        check_cron(expression)


def test_cron_shorthands_and_spacing():
    assert check_cron("@Daily") == "@daily"
    assert check_cron("  */5  *\t* * * ") == "*/5 * * * *"


# ---------------------------------------------------------------- POST /schedules refusals


@pytest.fixture
def keyed(fake_redis, tmp_path):
    return make_app(tmp_path, api_keys=(KEY_A, KEY_B), key_max_schedules=2).test_client()


def as_key(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


LOG = {"type": "log", "job": {"message": "tick"}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**LOG, "cron": "*/5 * * * *", "every": 60}, "every"),  # both
        (LOG, "cron"),  # neither
        ({**LOG, "cron": "every day"}, "cron"),
        ({**LOG, "cron": "0 0 30 2 *"}, "cron"),  # February 30: never
        ({**LOG, "cron": "* * * * *", "timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({**LOG, "cron": "* * * * *", "timezone": "localtime"}, "timezone"),
        ({**LOG, "every": 0}, "every"),
        ({**LOG, "every": MAX_EVERY + 1}, "every"),
        ({**LOG, "every": 1.5}, "every"),
        ({**LOG, "every": "60"}, "every"),
        ({**LOG, "every": 60, "timezone": "Europe/Berlin"}, "timezone"),
        ({"type": "nope", "job": {}, "every": 60}, "type"),
        ({"type": "log", "job": {"message": 42}, "every": 60}, "job.message"),
        ({"type": "log", "job": {"message": "x", "timeout": 10**9}, "every": 60}, "job.timeout"),
        ({**LOG, "every": 60, "colour": "red"}, "colour"),
    ],
)
def test_bad_schedules_are_refused_with_the_field(keyed, fake_redis, body, field):
    answer = keyed.post("/schedules", json=body, headers=as_key(KEY_A))
    assert answer.status_code == 422, answer.get_json()
    error = answer.get_json()["error"]
    assert error["code"] == "validation_failed"
    assert field in [detail["field"] for detail in error["details"]]
    assert not fake_redis.keys("afterward:schedule*")  # nothing stored


def test_another_keys_schedule_is_not_found_and_the_cap_holds(keyed):
    made = keyed.post("/schedules", json={**LOG, "every": 60}, headers=as_key(KEY_A))
    assert made.status_code == 201 and made.headers["Location"] == f"/schedules/{made.get_json()['id']}"
    schedule_id = made.get_json()["id"]
    for method, path in [
        ("get", f"/schedules/{schedule_id}"),
        ("post", f"/schedules/{schedule_id}/pause"),
        ("post", f"/schedules/{schedule_id}/resume"),
        ("delete", f"/schedules/{schedule_id}"),
    ]:
        answer = getattr(keyed, method)(path, headers=as_key(KEY_B))
        assert answer.status_code == 404, (method, path)
        assert (
            answer.get_json()
            == getattr(keyed, method)(path.replace(schedule_id, "0" * 32), headers=as_key(KEY_B)).get_json()
        )
    assert keyed.get("/schedules", headers=as_key(KEY_B)).get_json() == {"schedules": []}
    assert keyed.get(f"/schedules/{schedule_id}", headers=as_key(KEY_A)).status_code == 200

    assert keyed.post("/schedules", json={**LOG, "cron": "@hourly"}, headers=as_key(KEY_A)).status_code == 201
    full = keyed.post("/schedules", json={**LOG, "every": 5}, headers=as_key(KEY_A))
    assert full.status_code == 429
    assert full.get_json()["error"]["code"] == "quota_exceeded"
    assert full.get_json()["error"]["details"] == {"schedules": 2, "max_schedules": 2}
    # Another key's cap is its own; a deleted schedule makes room.
    assert keyed.post("/schedules", json={**LOG, "every": 5}, headers=as_key(KEY_B)).status_code == 201
    assert keyed.delete(f"/schedules/{schedule_id}", headers=as_key(KEY_A)).get_json() == {
        "id": schedule_id,
        "deleted": True,
    }
    assert keyed.post("/schedules", json={**LOG, "every": 5}, headers=as_key(KEY_A)).status_code == 201
    owners = {s["type"] for s in keyed.get("/schedules", headers=as_key(KEY_A)).get_json()["schedules"]}
    assert owners == {"log"} and key_owner(KEY_A) != key_owner(KEY_B)


def test_the_view_of_a_new_schedule(keyed):
    body = {**LOG, "cron": "0 9 * * 1-5", "timezone": "Europe/Berlin", "name": "morning", "paused": True}
    view = keyed.post("/schedules", json=body, headers=as_key(KEY_A)).get_json()
    assert view["paused"] is True and view["next_run_at"] is None
    assert (view["cron"], view["every"], view["timezone"], view["name"]) == (
        "0 9 * * 1-5",
        None,
        "Europe/Berlin",
        "morning",
    )
    assert (view["runs"], view["refused"], view["last_run_at"], view["last_job_id"]) == (0, 0, None, None)
    resumed = keyed.post(f"/schedules/{view['id']}/resume", headers=as_key(KEY_A)).get_json()
    assert resumed["paused"] is False and resumed["next_run_at"].endswith(":00:00.000Z")
    every = keyed.post("/schedules", json={**LOG, "every": 30}, headers=as_key(KEY_A)).get_json()
    assert every["timezone"] is None and every["every"] == 30
    created, due = (
        datetime.fromisoformat(every[name].replace("Z", "+00:00")) for name in ("created_at", "next_run_at")
    )
    assert (due - created).total_seconds() == pytest.approx(30, abs=0.002)
