"""A fair share per API key: workers take turns between keys, a key alone uses them all (jobs.engine.fair)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from jobs.engine import fair, pause
from jobs.engine.job import Job
from jobs.engine.maintenance import Scheduler
from jobs.engine.queue import EmbedQueue, Queue
from jobs.families import family_queues
from tests.support import WebService, start_workers, wait_until
from tests.test_security import KEY_A, KEY_B, make_app

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def post(client, headers: dict, body: dict, type_name: str = "sleep") -> str:
    response = client.post(f"/jobs/{type_name}", json=body, headers=headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def status(client, headers: dict, job_id: str) -> str:
    return client.get(f"/jobs/{job_id}", headers=headers).get_json()["status"]


def taken_order(fake_redis, family: str = "", most: int = 1) -> list[str]:
    """Ids in the order one worker of `family` takes them (each finished at once)."""
    queues = [
        (EmbedQueue if family else Queue)(name, connection=fake_redis) for name in family_queues(family)
    ]
    order = []
    while (taken := Queue.dequeue_any(queues, None, connection=fake_redis)) is not None:
        job, queue = taken
        for each in [job, *job.taken_with]:
            order.append(each.id)
            fake_redis.lrem(queue.intermediate_queue_key, 1, each.id)
    return order


def owner_of(fake_redis, job_id: str) -> str:
    return fake_redis.hget(f"rq:job:{job_id}", "afterward_owner").decode()


def take_one(fake_redis) -> str:
    """The id of the job a worker of the general queues takes next (its hand-over done)."""
    queues = [Queue(name, connection=fake_redis) for name in family_queues("")]
    job, queue = Queue.dequeue_any(queues, None, connection=fake_redis)
    fake_redis.lrem(queue.intermediate_queue_key, 1, job.id)
    return job.id


def start(fake_redis, job_id: str, queue: str = "default") -> None:
    """Take `job_id` (the next job) and keep it running, heartbeat alive, as a worker does."""
    assert take_one(fake_redis) == job_id
    fake_redis.zadd(f"rq:wip:{queue}", {f"{job_id}:execution": time.time() + 60})


def test_a_key_alone_may_have_every_job_waiting_taken_in_turn(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()
    ids = [post(client, A, {"seconds": 60}) for _ in range(4)]
    # One job of the key on the queue, the others behind it; all are queued, none held back.
    assert [status(client, A, job_id) for job_id in ids] == ["queued"] * 4
    assert fake_redis.llen("rq:queue:default") == 1
    assert Queue("default", connection=fake_redis).count == 4
    assert taken_order(fake_redis) == ids


def test_a_new_keys_job_waits_for_at_most_one_job_of_each_other_key(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()
    flood = [post(client, A, {"seconds": 60}) for _ in range(50)]
    theirs = post(client, B, {"seconds": 60})
    order = taken_order(fake_redis)
    assert order.index(theirs) <= 1, order.index(theirs)
    assert [job_id for job_id in order if job_id != theirs] == flood  # each key's own order kept


def test_the_key_with_fewer_jobs_running_goes_first_whatever_the_priority(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()
    start(fake_redis, post(client, A, {"seconds": 60, "queue": "high"}), "high")
    flood = [post(client, A, {"seconds": 60, "queue": "high"}) for _ in range(5)]
    theirs = post(client, B, {"seconds": 60, "queue": "low"})
    # A has one running, B none: B's low-priority job before A's high-priority ones.
    assert take_one(fake_redis) == theirs
    # Between keys with as many running, priority decides, then age.
    fake_redis.zadd("rq:wip:low", {f"{theirs}:execution": time.time() + 60})
    later = post(client, B, {"seconds": 60, "queue": "low"})
    assert take_one(fake_redis) == flood[0]
    fake_redis.zadd("rq:wip:high", {f"{flood[0]}:execution": time.time() + 60})
    assert take_one(fake_redis) == later  # A has two running now, B one


def test_a_dead_workers_job_stops_counting_when_its_heartbeat_lapses(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()
    lost = post(client, A, {"seconds": 60})
    assert take_one(fake_redis) == lost
    fake_redis.zadd("rq:wip:default", {f"{lost}:execution": time.time() - 1})  # heartbeat lapsed
    mine = post(client, A, {"seconds": 60})
    theirs = post(client, B, {"seconds": 60})
    assert taken_order(fake_redis) == [mine, theirs]  # A counts none running: first come first


def test_an_embedder_fills_its_batch_from_a_key_alone_and_shares_it_between_keys(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()
    queues = [EmbedQueue(name, connection=fake_redis) for name in family_queues("embed")]

    def batch() -> list[str]:
        """A batch the embedder takes, run and ended at once."""
        job, queue = EmbedQueue.dequeue_any(queues, None, connection=fake_redis)
        ids = [each.id for each in [job, *job.taken_with]]
        fake_redis.delete(queue.intermediate_queue_key)
        return ids

    alone = [post(client, A, {"text": f"document {i}"}, type_name="embed") for i in range(8)]
    assert batch() == alone
    mine = [post(client, A, {"text": f"a {i}"}, type_name="embed") for i in range(6)]
    theirs = [post(client, B, {"text": f"b {i}"}, type_name="embed") for i in range(2)]
    # Turn by turn while both keys have jobs waiting; then A's fill the batch.
    assert batch() == [mine[0], theirs[0], mine[1], theirs[1], *mine[2:]]


def test_a_cap_holds_a_keys_jobs_back_and_each_job_keeps_its_own(fake_redis, tmp_path, monkeypatch):
    app = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off", key_max_active=1)
    client = app.test_client()
    first, second = post(client, A, {"seconds": 60}), post(client, A, {"seconds": 60})
    start(fake_redis, first)
    queues = [Queue(name, connection=fake_redis) for name in family_queues("")]
    assert Queue.dequeue_any(queues, None, connection=fake_redis) is None  # A runs its one
    assert status(client, A, second) == "queued"
    # A later submission under a higher cap changes nothing for the jobs accepted before it.
    looser = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off", key_max_active=2).test_client()
    third = post(looser, A, {"seconds": 60})
    assert Queue.dequeue_any(queues, None, connection=fake_redis) is None  # `second` keeps cap 1
    fake_redis.delete("rq:wip:default")  # `first` ended
    assert taken_order(fake_redis) == [second, third]


def test_canceling_or_deleting_a_front_job_moves_its_key_on(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()
    ids = [post(client, A, {"seconds": 60}) for _ in range(4)]
    assert client.delete(f"/jobs/{ids[0]}", headers=A).get_json()["status"] == "canceled"
    assert client.delete(f"/jobs/{ids[2]}", headers=A).get_json()["status"] == "canceled"
    assert Queue("default", connection=fake_redis).count == 2
    Job.fetch(ids[1], connection=fake_redis).delete()  # as rq-dashboard deletes a job
    assert taken_order(fake_redis) == [ids[3]]
    assert Queue("default", connection=fake_redis).count == 0


def test_maintenance_moves_on_a_key_whose_front_vanished(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="off").test_client()
    ids = [post(client, A, {"seconds": 60}) for _ in range(3)]
    fake_redis.delete(f"rq:job:{ids[0]}")  # behind the engine's back
    fake_redis.lrem("rq:queue:default", 1, ids[0])
    queue = Queue("default", connection=fake_redis)
    assert fair.repair(fake_redis, queue, Job.redis_job_namespace_prefix) == 1
    assert taken_order(fake_redis) == ids[1:]


def test_emptying_a_queue_deletes_the_jobs_waiting_their_turn_too(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()
    ids = [post(client, key, {"seconds": 60}) for key in (A, B, A, A, B)]
    assert Queue("default", connection=fake_redis).empty() == 5
    assert not any(fake_redis.exists(f"rq:job:{job_id}") for job_id in ids)
    assert Queue("default", connection=fake_redis).count == 0
    assert [post(client, A, {"seconds": 1})] == taken_order(fake_redis)


def test_due_jobs_join_their_keys_turn(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()
    delayed = [post(client, A, {"seconds": 60, "delay": 1}) for _ in range(5)]
    fake_redis.zadd("rq:scheduled:default", dict.fromkeys(delayed, 0))  # all due now
    scheduler = Scheduler([Queue("default", connection=fake_redis)], connection=fake_redis)
    scheduler.acquire_locks()
    scheduler.enqueue_scheduled_jobs()
    theirs = post(client, B, {"seconds": 60})
    assert fake_redis.llen("rq:queue:default") == 2  # A's one, and B's
    assert taken_order(fake_redis).index(theirs) <= 1


def test_a_paused_queue_holds_every_keys_jobs_and_due_jobs_wait_on_it(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off").test_client()
    pause.pause(fake_redis, "default", by="ops")
    held = [post(client, A, {"seconds": 60}), post(client, B, {"seconds": 60})]
    delayed = post(client, A, {"seconds": 60, "delay": 1})
    fake_redis.zadd("rq:scheduled:default", {delayed: 0})  # due now
    scheduler = Scheduler([Queue("default", connection=fake_redis)], connection=fake_redis)
    scheduler.acquire_locks()
    scheduler.enqueue_scheduled_jobs()
    elsewhere = post(client, A, {"seconds": 60, "queue": "low"})
    assert taken_order(fake_redis) == [elsewhere]
    assert [status(client, A, job_id) for job_id in (held[0], delayed)] == ["queued", "queued"]
    pause.resume(fake_redis, "default")
    assert taken_order(fake_redis) == [held[0], held[1], delayed]


def test_without_api_keys_there_is_one_tenant_queued_first_come_first_served(fake_redis, tmp_path):
    client = make_app(tmp_path, rate_limit="off", key_max_active=1).test_client()
    ids = [post(client, {}, {"seconds": 60}) for _ in range(3)]
    assert [status(client, {}, job_id) for job_id in ids] == ["queued"] * 3
    assert fake_redis.llen("rq:queue:default") == 3
    assert taken_order(fake_redis) == ids


@pytest.fixture
def keyed_web(env, proc_dir) -> Iterator[WebService]:
    web = WebService(dict(env, API_KEYS=f"{KEY_A},{KEY_B}"), proc_dir)
    yield web
    web.kill()


def test_a_key_alone_uses_every_worker_and_another_keys_job_starts_next(keyed_web, env, proc_dir, real_redis):
    pool = start_workers(env, proc_dir, count=2)
    try:
        wait_until(lambda: real_redis.scard("rq:workers") >= 2, what="two workers", process=pool)
        http = keyed_web.http

        def submit(headers: dict, type_name: str, body: dict) -> str:
            response = http.post(keyed_web.url(f"/jobs/{type_name}"), json=body, headers=headers, timeout=30)
            assert response.status_code == 202, response.text
            return response.json()["id"]

        def view(headers: dict, job_id: str, wait: float = 0) -> dict:
            params = {"wait": wait} if wait else {}
            url = keyed_web.url(f"/jobs/{job_id}")
            return http.get(url, params=params, headers=headers, timeout=90).json()

        mine = [submit(A, "hold", {"seconds": 1}) for _ in range(12)]
        # Alone, key A has both workers (the former fixed share let a key hold one of two).
        wait_until(
            lambda: sum(view(A, job_id)["status"] == "started" for job_id in mine[:2]) == 2,
            what="key A's first two jobs running side by side",
        )
        theirs = view(B, submit(B, "log", {"message": "key B"}), wait=30)
        assert theirs["status"] == "finished", theirs
        created, started = (datetime.fromisoformat(theirs[name]) for name in ("created_at", "started_at"))
        # Key B's job waited for at most one job of key A to start before it.
        ahead = [
            job_id
            for job_id in mine
            if (at := view(A, job_id)["started_at"]) and created < datetime.fromisoformat(at) < started
        ]
        assert len(ahead) <= 1, (ahead, theirs)
        for job_id in mine:
            assert view(A, job_id, wait=30)["status"] == "finished"
    finally:
        pool.kill()


def test_a_key_may_have_only_so_many_jobs_waiting(fake_redis, tmp_path):
    client = make_app(
        tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off", key_max_waiting=3, key_max_active=1
    ).test_client()
    ids = [post(client, A, {"seconds": 60, "delay": 600}) for _ in range(3)]
    refused = client.post("/jobs/sleep", json={"seconds": 60}, headers=A)
    assert refused.status_code == 429
    error = refused.get_json()["error"]
    assert error["code"] == "quota_exceeded" and error["details"]["jobs_waiting"] == 3
    # Another key is not affected; a canceled job frees its place.
    post(client, B, {"seconds": 60})
    assert client.delete(f"/jobs/{ids[0]}", headers=A).get_json()["status"] == "canceled"
    post(client, A, {"seconds": 60})
    # A repeat of an accepted request takes no second place.
    first = client.post("/jobs/sleep", json={"seconds": 1}, headers={**A, "Idempotency-Key": "same"})
    assert first.status_code == 429  # the key is full again
    client.delete(f"/jobs/{ids[1]}", headers=A)
    for expected in (202, 200, 200):
        again = client.post("/jobs/sleep", json={"seconds": 1}, headers={**A, "Idempotency-Key": "same"})
        assert again.status_code == expected, again.get_json()


def test_and_only_so_many_bytes_of_them(fake_redis, tmp_path):
    client = make_app(tmp_path, api_keys=(KEY_A,), rate_limit="off", key_max_waiting_mb=1).test_client()
    documents = [{"text": "x" * 9000} for _ in range(40)]  # about 360 KB a request
    for _ in range(2):
        post(client, A, {"documents": documents}, type_name="embed")
    refused = client.post("/jobs/embed", json={"documents": documents}, headers=A)
    assert refused.status_code == 429, refused.get_json()
    assert refused.get_json()["error"]["details"]["bytes_waiting"] > 700_000


def test_a_scheduled_job_that_never_runs_expires(fake_redis, tmp_path):
    client = make_app(tmp_path, rate_limit="off", max_delay=3600, result_ttl=600).test_client()
    job_id = post(client, {}, {"seconds": 1, "delay": 60})
    assert 3600 < fake_redis.ttl(f"rq:job:{job_id}") <= 3600 + 600
    queued = post(client, {}, {"seconds": 1})
    assert fake_redis.ttl(f"rq:job:{queued}") == -1  # a queued job waits for its worker


def test_a_key_spends_its_search_budget_and_no_more(fake_redis, tmp_path, monkeypatch):
    app = make_app(tmp_path, api_keys=(KEY_A, KEY_B), rate_limit="off", search_budget=30)
    searched = []
    monkeypatch.setattr(
        app.extensions["afterward"].search, "search", lambda q, k, w, namespace: searched.append(k) or []
    )
    client = app.test_client()
    heavy = {"query": "x" * 10_000, "k": 100}  # costs 1 + 20 + 4
    assert client.post("/search", json=heavy, headers=A).status_code == 200
    refused = client.post("/search", json=heavy, headers=A)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "search_budget_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert client.get("/search", query_string={"q": "short"}, headers=A).status_code == 200  # 25 + 1 + 1
    assert client.get("/search", query_string={"q": "short"}, headers=B).status_code == 200
    assert searched == [100, 10, 10]
