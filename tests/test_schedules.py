"""Recurring schedules on the real stack: ticks, one job per tick whoever ticks, pause, resume,
delete, catch-up, quotas, restarts and the command line (jobs.schedules, service.views.schedules).

The ticker's own tests (catch-up, concurrent claims, quota refusals) run it in this process
against the test Redis with a clock of their own; the others run the Procfile's processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from datetime import datetime
from itertools import pairwise
from typing import Any

import pytest
import redis

from jobs import keys, quota, schedules
from jobs.engine.job import Job
from jobs.schedules import LOCK_SECONDS, Schedule, Ticker, Timing
from jobs.settings import Settings
from jobs.times import iso_timestamp
from service.security import key_owner
from tests.support import ROOT, WebService, start_workers, wait_until
from tests.test_cli import run
from tests.test_security import KEY_A, KEY_B

pytestmark = pytest.mark.integration

LOG = {"type": "log", "job": {"message": "tick"}}


class Clock:
    """A clock the test moves: the ticker's `time.time`."""

    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def stored(
    connection: redis.Redis, owner: str = "public", every: int = 10, at: float | None = None
) -> Schedule:
    """A schedule written as POST /schedules writes it, created at `at`."""
    at = time.time() if at is None else at
    timing = Timing(every=every)
    schedule = Schedule(
        id=schedules.new_id(),
        owner=owner,
        type="log",
        job={"message": "tick"},
        timing=timing,
        created_at=at,
        next_run_at=timing.first_after(at),
    )
    schedules.create(connection, schedule, cap=0)
    return schedule


def ticker(connection: redis.Redis, clock: Clock, **settings: Any) -> Ticker:
    return Ticker(connection, Settings(extra_job_modules=("tests.fixtures",), **settings), clock=clock)


def jobs_of(connection: redis.Redis, schedule_id: str, owner: str = "public") -> list[Job]:
    """The schedule's jobs, read from Redis (not through the API under test)."""
    ids = [i.decode() for i in connection.zrange(keys.recent_jobs(owner), 0, -1)]
    found = [job for job in Job.fetch_many(ids, connection=connection) if job is not None]
    return [job for job in found if job.meta.get("schedule") == schedule_id]


def tick_times(jobs: list[Job]) -> list[float]:
    return sorted(datetime.fromisoformat(job.meta["tick"].replace("Z", "+00:00")).timestamp() for job in jobs)


def lead(ticker: Ticker) -> None:
    """Looks until the ticker has taken the lead and ticked what is due."""
    for _ in range(10):
        if ticker.look() != 0:
            return
    raise AssertionError("the ticker kept finding work")


# ---------------------------------------------------------------- the ticker, with a test clock


def test_ticks_missed_while_no_ticker_ran_make_one_job(real_redis):
    start = time.time()
    schedule = stored(real_redis, every=10, at=start)
    # Nothing ticked for 50 intervals: then a ticker starts.
    clock = Clock(start + 10 + 50 * 10 + 3)
    lead(ticker(real_redis, clock))
    jobs = jobs_of(real_redis, schedule.id)
    assert len(jobs) == 1
    assert jobs[0].meta["tick"] == iso_timestamp(schedule.next_run_at)  # the first tick missed
    after = schedules.load(real_redis, schedule.id, "public")
    assert after.runs == 1 and after.last_job_id == jobs[0].id
    assert after.next_run_at == pytest.approx(start + 10 + 51 * 10, abs=0.002)  # the first tick after now
    assert jobs[0].get_status() == "queued" and jobs[0].meta["type"] == "log"

    again = ticker(real_redis, clock)  # another process, the same moment: nothing more is due
    real_redis.delete(keys.SCHEDULES_TICKER)
    lead(again)
    assert len(jobs_of(real_redis, schedule.id)) == 1
    clock.at = after.next_run_at
    lead(again)
    assert tick_times(jobs_of(real_redis, schedule.id))[-1] == pytest.approx(after.next_run_at, abs=0.002)


def test_cron_catch_up_is_one_job_then_the_next_tick_after_now(real_redis):
    start = time.time()
    timing = Timing(cron="*/5 * * * *", timezone="Europe/Berlin")
    schedule = Schedule(
        id=schedules.new_id(),
        owner="public",
        type="log",
        job={"message": "cron"},
        timing=timing,
        created_at=start,
        next_run_at=timing.first_after(start),
    )
    schedules.create(real_redis, schedule, cap=0)
    clock = Clock(schedule.next_run_at + 3 * 3600 + 1)  # three hours of ticks missed
    lead(ticker(real_redis, clock))
    assert len(jobs_of(real_redis, schedule.id)) == 1
    following = schedules.load(real_redis, schedule.id, "public").next_run_at
    assert clock.at < following <= clock.at + 300 and following % 300 == 0


def test_tickers_that_all_think_they_lead_make_one_job_per_tick(real_redis):
    """Exactly once comes from each tick's transaction, not from the lock: four tickers that
    each believe they lead claim the same ticks at the same moments."""
    start = time.time()
    schedule = stored(real_redis, every=10, at=start)
    clock = Clock(start)
    tickers = [ticker(real_redis, clock) for _ in range(4)]
    made: list[str | None] = []
    for tick in range(20):
        clock.at = start + 10 * (tick + 1) + 0.5
        ready = threading.Barrier(len(tickers))

        def claim(each: Ticker, ready: threading.Barrier) -> None:
            ready.wait()
            made.append(each.tick(schedule.id))

        threads = [threading.Thread(target=claim, args=(each, ready)) for each in tickers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    jobs = jobs_of(real_redis, schedule.id)
    assert len([job_id for job_id in made if job_id]) == len(jobs) == 20
    assert tick_times(jobs) == pytest.approx([start + 10 * (n + 1) for n in range(20)], abs=0.002)
    assert schedules.load(real_redis, schedule.id, "public").runs == 20


def test_a_tick_refused_by_the_keys_share_is_recorded_and_the_schedule_goes_on(real_redis):
    owner = key_owner(KEY_A)
    start = time.time()
    schedule = stored(real_redis, owner=owner, every=10, at=start)
    clock = Clock(start + 10.1)
    keyed = ticker(real_redis, clock, api_keys=(KEY_A,), key_max_waiting=1)
    lead(keyed)
    (first,) = jobs_of(real_redis, schedule.id, owner)
    assert first.meta[quota.META_FIELD] == 1 and real_redis.zscore(keys.waiting(owner), first.id) is not None

    clock.at += 10  # the first job still waits (no worker runs): the key's share is full
    lead(keyed)
    refused = schedules.load(real_redis, schedule.id, owner)
    assert (refused.runs, refused.refused) == (1, 1)
    assert refused.last_error["code"] == "quota_exceeded" and "1 jobs" in refused.last_error["message"]
    assert refused.next_run_at == pytest.approx(start + 30, abs=0.002)
    assert len(jobs_of(real_redis, schedule.id, owner)) == 1

    with real_redis.pipeline() as pipe:  # the first job starts: its place is free
        quota.release(pipe, owner, first.id)
        pipe.execute()
    clock.at += 10
    lead(keyed)
    assert schedules.load(real_redis, schedule.id, owner).runs == 2
    assert len(jobs_of(real_redis, schedule.id, owner)) == 2


def test_a_body_a_lowered_limit_now_refuses_is_a_refused_tick(real_redis):
    start = time.time()
    schedule = stored(real_redis, every=10, at=start)  # {"message": "tick"}: 4 characters
    clock = Clock(start + 10.1)
    lead(ticker(real_redis, clock, max_log_chars=3))
    refused = schedules.load(real_redis, schedule.id, "public")
    assert (refused.runs, refused.refused, refused.last_error["code"]) == (0, 1, "validation_failed")
    assert refused.next_run_at == pytest.approx(start + 20, abs=0.002)
    assert jobs_of(real_redis, schedule.id) == []


# ---------------------------------------------------------------- the Procfile's processes


def api(web: WebService, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return web.http.request(method, web.url(path), headers=headers, timeout=30, **kwargs)


def ticker_up(connection: redis.Redis) -> str:
    return wait_until(
        lambda: connection.get(keys.SCHEDULES_TICKER), what="a worker to lead the ticks"
    ).decode()


def test_every_two_seconds_runs_three_times_in_seven(web, workers, real_redis):
    workers(count=1)
    ticker_up(real_redis)
    other = web.post_job("log", {"message": "not the schedule's"}).json()["id"]
    made = api(web, "POST", "/schedules", json={**LOG, "every": 2})
    assert made.status_code == 201, made.text
    schedule = made.json()
    assert made.headers["Location"] == f"/schedules/{schedule['id']}"
    time.sleep(7)
    runs = api(web, "POST", f"/schedules/{schedule['id']}/pause").json()["runs"]
    assert 2 <= runs <= 4
    listed = api(web, "GET", "/jobs", params={"schedule": schedule["id"]}).json()["jobs"]
    assert len(listed) == runs and other not in {job["id"] for job in listed}
    for job in listed:
        web.wait_for_status(job["id"], {"finished"})


def test_one_job_per_tick_when_the_ticking_worker_is_killed(web, workers, real_redis):
    """Two worker processes (one per host, say) and the session's two web processes; the
    worker that ticks is SIGKILLed and the other takes over: every tick made one job."""
    workers(count=1)
    workers(count=1)
    holder = ticker_up(real_redis)
    schedule = api(web, "POST", "/schedules", json={**LOG, "every": 1}).json()

    def runs() -> int:
        return api(web, "GET", f"/schedules/{schedule['id']}").json()["runs"]

    wait_until(lambda: runs() >= 3, what="three ticks")
    os.kill(int(holder.split(":")[1]), signal.SIGKILL)
    killed_at = time.monotonic()
    successor = wait_until(
        lambda: (value := real_redis.get(keys.SCHEDULES_TICKER)) and value.decode() != holder and value,
        what="another worker to take the lead",
    )
    took_over = time.monotonic() - killed_at
    assert successor.decode().split(":")[1] != holder.split(":")[1]
    before = runs()
    wait_until(lambda: runs() >= before + 3, what="three ticks after the takeover")
    final = api(web, "POST", f"/schedules/{schedule['id']}/pause").json()

    jobs = jobs_of(real_redis, schedule["id"])
    ticks = tick_times(jobs)
    assert len(ticks) == len(set(ticks)) == final["runs"]  # no tick twice, no job uncounted
    gaps = [later - earlier for earlier, later in pairwise(ticks)]
    assert all(gap == pytest.approx(round(gap), abs=0.01) and gap >= 1 for gap in gaps)  # on the rhythm
    assert max(gaps) <= took_over + 2  # the ticks missed are only those of the takeover
    assert took_over < LOCK_SECONDS + 5


def test_pause_resume_and_delete_take_effect_at_the_next_tick(web, workers, real_redis):
    workers(count=1)
    ticker_up(real_redis)
    schedule_id = api(web, "POST", "/schedules", json={**LOG, "every": 1}).json()["id"]
    path = f"/schedules/{schedule_id}"
    wait_until(lambda: api(web, "GET", path).json()["runs"] >= 2, what="two ticks")

    pausing = time.time()
    paused = api(web, "POST", path + "/pause").json()
    assert paused["paused"] is True and paused["next_run_at"] is None
    time.sleep(2.5)  # two ticks' worth
    assert api(web, "GET", path).json()["runs"] == paused["runs"]

    resuming = time.time()
    resumed = api(web, "POST", path + "/resume").json()
    due = datetime.fromisoformat(resumed["next_run_at"].replace("Z", "+00:00")).timestamp()
    assert due > resuming  # from now on: the paused time is not caught up
    wait_until(lambda: api(web, "GET", path).json()["runs"] >= paused["runs"] + 2, what="ticks after resume")
    ticks = tick_times(jobs_of(real_redis, schedule_id))
    assert not [tick for tick in ticks if pausing < tick < resuming]

    deleting = time.time()
    assert api(web, "DELETE", path).json() == {"id": schedule_id, "deleted": True}
    made = len(jobs_of(real_redis, schedule_id))
    time.sleep(2.5)
    assert api(web, "GET", path).status_code == 404
    assert len(jobs_of(real_redis, schedule_id)) == made
    assert not [tick for tick in tick_times(jobs_of(real_redis, schedule_id)) if tick > deleting]
    assert not real_redis.zscore(keys.SCHEDULES_DUE, schedule_id)


def test_schedules_are_each_keys_own_capped_and_survive_a_restart(env, proc_dir, real_redis):
    keyed = dict(env, API_KEYS=f"{KEY_A},{KEY_B}", KEY_MAX_SCHEDULES="1", RATE_LIMIT="off")
    web = WebService(keyed, proc_dir, name="web-1")
    worker = start_workers(keyed, proc_dir)
    try:
        made = api(web, "POST", "/schedules", KEY_A, json={**LOG, "every": 1})
        assert made.status_code == 201, made.text
        path = made.headers["Location"]
        full = api(web, "POST", "/schedules", KEY_A, json={**LOG, "cron": "@daily"})
        assert full.status_code == 429 and full.json()["error"]["code"] == "quota_exceeded"
        for method, suffix in [("GET", ""), ("POST", "/pause"), ("POST", "/resume"), ("DELETE", "")]:
            assert api(web, method, path + suffix, KEY_B).status_code == 404
        assert api(web, "GET", "/schedules", KEY_B).json() == {"schedules": []}
        bad = api(web, "POST", "/schedules", KEY_B, json={**LOG, "cron": "* * * * *", "timezone": "Nowhere"})
        assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "timezone"
        wait_until(lambda: api(web, "GET", path, KEY_A).json()["runs"] >= 1, what="a tick", process=worker)
    finally:
        web.stop()
        worker.stop()
    before = api_free_read(real_redis, path)

    web = WebService(keyed, proc_dir, name="web-2")
    worker = start_workers(keyed, proc_dir)
    try:
        assert api(web, "GET", path, KEY_A).json()["id"] == path.rsplit("/", 1)[1]
        wait_until(
            lambda: api(web, "GET", path, KEY_A).json()["runs"] >= before.runs + 2,
            what="ticks after the restart",
            process=worker,
        )
        listed = api(web, "GET", "/jobs", KEY_A, params={"schedule": before.id, "limit": 200}).json()["jobs"]
        assert before.last_job_id in {job["id"] for job in listed}  # jobs of both lives
        assert api(web, "GET", "/jobs", KEY_B, params={"schedule": before.id}).json() == {"jobs": []}
    finally:
        web.stop()
        worker.stop()


def api_free_read(connection: redis.Redis, path: str) -> Schedule:
    return schedules.load(connection, path.rsplit("/", 1)[1], key_owner(KEY_A))


def cli(*args: str) -> Any:
    """The `afterward` command line of this tree, whichever copy is installed."""
    return run(*args, env={"PYTHONPATH": str(ROOT / "client")})


def test_the_curl_example_in_the_api_docs(web, real_redis):
    section = (ROOT / "docs" / "api.md").read_text().split("### Schedules", 1)[1]
    command = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("localhost:5000", web.base)
    answer = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30, check=True)
    schedule = json.loads(answer.stdout)
    assert (schedule["cron"], schedule["timezone"], schedule["job"]) == (
        "0 9 * * 1-5",
        "Europe/Berlin",
        {"message": "good morning"},
    )
    assert schedules.load(real_redis, schedule["id"], "public").next_run_at is not None


def test_the_command_line_manages_schedules(web, real_redis):
    every = cli("schedules", "create", "log", "--every", "60", "--message", "from the cli", "--url", web.base)
    assert every.returncode == 0, every.stderr
    made = json.loads(every.stdout)
    assert (made["every"], made["job"], made["paused"]) == (60, {"message": "from the cli"}, False)
    assert f"created schedule {made['id']}" in every.stderr
    cron = cli(
        "schedules", "create", "log", "--cron", "0 9 * * 1-5", "--timezone", "Europe/Berlin", "--paused",
        "--name", "mornings", "--message", "hi", "--level", "warning", "--url", web.base,
    )  # fmt: skip
    assert cron.returncode == 0, cron.stderr
    morning = json.loads(cron.stdout)
    assert morning["job"] == {"message": "hi", "level": "warning"} and morning["paused"] is True

    listed = cli("schedules", "list", "--url", web.base)
    assert listed.returncode == 0, listed.stderr
    assert made["id"] in listed.stdout and morning["id"] in listed.stdout
    assert "every 60 s" in listed.stdout and "Europe/Berlin" in listed.stdout and "mornings" in listed.stdout
    assert json.loads(cli("schedules", "resume", morning["id"], "--url", web.base).stdout)["paused"] is False
    assert json.loads(cli("schedules", "pause", made["id"], "--url", web.base).stdout)["paused"] is True
    shown = json.loads(cli("schedules", "show", made["id"], "--url", web.base).stdout)
    assert shown["paused"] is True and shown["next_run_at"] is None
    deleted = cli("schedules", "delete", made["id"], "--url", web.base)
    assert json.loads(deleted.stdout) == {"id": made["id"], "deleted": True}
    gone = cli("schedules", "show", made["id"], "--url", web.base)
    assert gone.returncode == 1 and "404 not_found" in gone.stderr

    both = cli(
        "schedules", "create", "log", "--cron", "@daily", "--every", "5", "--message", "x", "--url", web.base
    )
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    unknown = cli("schedules", "create", "log", "--every", "5", "--colour", "red", "--url", web.base)
    assert unknown.returncode == 2 and "unknown field(s) --colour" in unknown.stderr
    refused = cli("schedules", "create", "log", "--cron", "every day", "--message", "x", "--url", web.base)
    assert refused.returncode == 1 and "validation_failed" in refused.stderr and '"cron"' in refused.stderr
