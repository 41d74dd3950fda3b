"""Fair share under faults: three keys flood the workers and the embedder while processes die.

With KEY_MAX_ACTIVE at its default (no cap), workers take turns between keys (jobs.engine.fair).
A key alone may use every slot of a process type (its workers, or an embedder's batch); once n
keys all have jobs waiting, none runs more than ceil(W / n) of its W slots, as soon as the jobs
started before the others were waiting have ended. A monitor reads, every 50 ms and in one
atomic step, what each key runs and whether it has jobs waiting, through a worker SIGKILL, a
work-horse SIGKILL, an embedder SIGKILL, a worker SIGTERM and a Redis restart; every sample
taken while all keys have been waiting for longer than a job takes must hold, and every
accepted job must end.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import psutil
import pytest
import redis
import requests

from jobs.families import EMBED, GENERAL, family_queues
from tests.support import wait_until
from tests.test_faults import fault_db, fault_env, fault_redis, fweb, fworkers  # noqa: F401 - fixtures
from tests.test_security import make_app  # noqa: F401 - keeps the keys' names in one place

pytestmark = [pytest.mark.integration, pytest.mark.faults]

KEYS = ("key-one-0123456789", "key-two-0123456789", "key-three-012345678")
WORKERS = 2
# Jobs one embedder worker runs together (EMBED_BATCH_JOBS; 32 by default): small, so that the
# embedder falls behind the clients and every key keeps jobs waiting.
BATCH = 2
# Texts of the model's 256 tokens: slow enough to encode that embed jobs too wait.
LONG_TEXT = " ".join(["a river runs past the copper lantern of the old harbour"] * 30)
# Longer than a job (0.3 s) or an embedder's batch takes: jobs a key started while the others
# had nothing waiting have ended by then.
SETTLE = 3.0

# Per owner: jobs running in the family (started with a live heartbeat, or taken) and whether
# any is waiting (its job on a queue, or jobs waiting behind it). ARGV: now, the queue names.
SNAPSHOT = """
local running, waiting = {}, {}
local function owner(id)
  return redis.call('HGET', 'rq:job:' .. id, 'afterward_owner') or ''
end
for i = 2, #ARGV do
  local name = ARGV[i]
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', 'rq:wip:' .. name, '(' .. ARGV[1], '+inf')) do
    local o = owner(string.match(member, '^(.*):[^:]*$'))
    running[o] = (running[o] or 0) + 1
  end
  for _, id in ipairs(redis.call('LRANGE', 'rq:queue:' .. name .. ':intermediate', 0, -1)) do
    local o = owner(id)
    running[o] = (running[o] or 0) + 1
  end
  for _, id in ipairs(redis.call('LRANGE', 'rq:queue:' .. name, 0, 200)) do waiting[owner(id)] = 1 end
  for _, o in ipairs(redis.call('SMEMBERS', 'afterward:fair:' .. name .. ':owners')) do waiting[o] = 1 end
end
local out = {}
for o, n in pairs(running) do out[#out + 1] = 'r|' .. o .. '|' .. n end
for o, _ in pairs(waiting) do out[#out + 1] = 'w|' .. o end
return out
"""


class Monitor(threading.Thread):
    """Samples each process type's share while the test runs; records every breach."""

    def __init__(self, url: str, owners: set[str]) -> None:
        super().__init__(name="fair-share-monitor", daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.owners = owners
        self.stopping = threading.Event()
        self.checked = {GENERAL: 0, EMBED: 0}
        self.breaches: list[tuple[str, dict[str, int]]] = []
        # Since when every key has had jobs waiting, per process type (None: one has not).
        self.all_waiting_since: dict[str, float | None] = {GENERAL: None, EMBED: None}

    def run(self) -> None:
        slots = {GENERAL: WORKERS, EMBED: BATCH}
        while not self.stopping.wait(0.05):
            for family in (GENERAL, EMBED):
                try:
                    answer = self.client.eval(SNAPSHOT, 0, time.time(), *family_queues(family))
                except redis.RedisError:
                    continue  # Redis restarting
                running: dict[str, int] = {}
                waiting: set[str] = set()
                for entry in (item.decode() for item in answer):
                    kind, owner, *count = entry.split("|")
                    if kind == "r":
                        running[owner] = int(count[0])
                    else:
                        waiting.add(owner)
                now = time.monotonic()
                if not self.owners <= waiting:
                    self.all_waiting_since[family] = None
                    continue  # a key alone, or two of three, may use what the others leave
                since = self.all_waiting_since[family] = self.all_waiting_since[family] or now
                if now - since < SETTLE:
                    continue
                self.checked[family] += 1
                # A dead worker's job counts until its heartbeat lapses: a slot more meanwhile.
                share = math.ceil(max(slots[family], sum(running.values())) / len(self.owners))
                if max(running.values(), default=0) > share:
                    self.breaches.append((family or "general", running))


# Its drain alone takes minutes on a busy 2-core machine: more than the suite's 300 s default.
@pytest.mark.timeout(600)
def test_no_key_runs_more_than_its_share_through_kills_and_a_redis_restart(
    fault_env,  # noqa: F811
    fault_redis,  # noqa: F811
    fault_db,  # noqa: F811
    fworkers,  # noqa: F811
    tmp_path,
):
    from scripts.stack import WebService
    from service.security import key_owner

    env = dict(fault_env, API_KEYS=",".join(KEYS), RATE_LIMIT="off")
    web = WebService(env, tmp_path, name="web-keyed")
    accepted: list[tuple[str, str]] = []  # (key, job id)
    stop = threading.Event()
    try:
        workers = fworkers(count=WORKERS, API_KEYS=env["API_KEYS"])
        embedder = fworkers(count=1, kind="embedder", API_KEYS=env["API_KEYS"], EMBED_BATCH_JOBS=str(BATCH))

        def client(key: str, type_name: str, body: dict, per_second: float) -> None:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {key}"
            while not stop.wait(1 / per_second):
                try:
                    response = session.post(web.url(f"/jobs/{type_name}"), json=body, timeout=10)
                except requests.RequestException:
                    continue
                if response.status_code == 202:
                    accepted.append((key, response.json()["id"]))

        # A backlog for every key, then more than the workers can take (2 workers x 1/0.3 s).
        for key in KEYS:
            for _ in range(10):
                response = requests.post(
                    web.url("/jobs/hold"),
                    json={"seconds": 0.3, "retries": 2},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=10,
                )
                accepted.append((key, response.json()["id"]))
        clients = [
            threading.Thread(target=client, args=(key, "hold", {"seconds": 0.3, "retries": 2}, 2.5))
            for key in KEYS
        ] + [
            threading.Thread(target=client, args=(key, "embed", {"text": LONG_TEXT, "retries": 2}, 10))
            for key in KEYS
        ]
        monitor = Monitor(fault_redis.url, {key_owner(key) for key in KEYS})
        monitor.start()
        for thread in clients:
            thread.start()

        def general_workers() -> list[psutil.Process]:
            return psutil.Process(workers.pid).children()

        wait_until(lambda: len(general_workers()) == WORKERS, what="the workers")
        time.sleep(5)
        general_workers()[0].kill()  # a worker (and its job) gone at once
        time.sleep(8)
        running = [job for _, job in accepted if fault_db.hget(f"rq:job:{job}", "status") == b"started"]
        pids = [fault_db.get(f"afterward-test:pid:{job}") for job in running]
        horse = next((int(pid) for pid in pids if pid), None)
        if horse is not None:
            os.kill(horse, signal.SIGKILL)  # a job's process crashes
        time.sleep(8)
        for worker in psutil.Process(embedder.pid).children():
            worker.kill()  # the embedder, with its batch
        time.sleep(8)
        general_workers()[-1].send_signal(signal.SIGTERM)  # a warm stop of one worker
        time.sleep(8)
        fault_redis.process.send_signal(signal.SIGTERM)  # Redis restarts (append-only file on)
        fault_redis.process.wait(10)
        time.sleep(1)
        fault_redis.start()
        time.sleep(10)
        stop.set()
        for thread in clients:
            thread.join()

        def ended(job_id: str) -> bool:
            return fault_db.hget(f"rq:job:{job_id}", "status") in (b"finished", b"failed")

        wait_until(lambda: all(ended(job) for _, job in accepted), timeout=420, what="every accepted job")
        monitor.stopping.set()
        monitor.join()
        assert monitor.breaches == [], monitor.breaches[:10]
        # The bound was checked while all three keys had work waiting, in both process types.
        assert monitor.checked[GENERAL] > 100 and monitor.checked[EMBED] > 10, monitor.checked
        print(f"\nfair share held in {monitor.checked} samples; {len(accepted)} jobs accepted")
    finally:
        stop.set()
        web.kill()
