"""Failover: what clients see while the Redis primary is killed again and again.

    .venv/bin/python -m bench.failover [--kills 5] [--partitions 1] [--clients 4] [--interval 4]

A private primary, replica and three Sentinels (scripts.sentinel: down-after 3 s) and the
Procfile's processes on its `redis+sentinel://` URL, every setting at its default: the web
process (2 gunicorn processes), `rq worker-pool` with 2 workers and the embedder (1 worker).
Each of `--clients` client threads (an API key each) submits jobs with an Idempotency-Key,
one embed job in five and log jobs otherwise, and long-polls each to its end before the next;
one more client submits such jobs back to back (50 a second at most) without waiting for
them. A 503 is sent again with the same key after 0.1 s (sooner than its Retry-After, to time
the recovery closely). Every `--interval` seconds of load the primary is SIGKILLed, `--kills`
times; once the Sentinels have promoted the replica, the killed node restarts as its replica,
so the next kill strikes the other node. Then, `--partitions` times, the primary is frozen
with SIGSTOP, failed over, and resumed with SIGCONT: it must come back demoted.

The whole run is made twice, on a fresh topology each: REDIS_MIN_REPLICAS=0 (the default:
Redis replicates asynchronously, and takes writes without replicas; one replica) and
REDIS_MIN_REPLICAS=1 (the API acknowledges a job only once a replica has it), with Redis set
as the release check asks for it: min-replicas-to-write 1, min-replicas-max-lag (2 s) below
down-after, and two replicas, so that a failover leaves one to confirm writes while the
killed node restarts (with one, writes stop until it is back).

- acknowledged: jobs answered 202. lost: acknowledged, then gone (404) or never ended.
- ended failed: none of these jobs fails by itself; a failed one was recovered as abandoned
  (its worker's record of its start or end did not reach the new primary).
- run twice: log jobs whose line is in LOG_FILE more than once (each run writes one line;
  counted per request, by its Idempotency-Key in the message, so that two jobs made for one
  key count as well as one job run twice).
- other answers: any answer but 202, an idempotent replay (200) or a JSON 503.
- kill -> 202: from the kill to the first 202 to a request sent after it.
- kill -> workers: from the kill until every worker's heartbeat is written on the new
  primary. A worker heartbeats from the loop that takes its jobs, before each dequeue (at
  most once a second) and every JOB_MONITORING_INTERVAL (5 s) when idle: a bound on when
  that loop moved to the new primary, within a second for a busy worker.
- submit: POST -> 202 latency of requests sent while no fault was in progress (from each
  fault until the old primary replicates the new one).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from pathlib import Path

import psutil
import redis
import requests
from rq.utils import utcparse

from bench.common import ClientKeys, median, ms, percentile, result
from jobs.settings import Settings
from scripts.processes import Process, wait_until
from scripts.sentinel import Node, SentinelTopology
from scripts.stack import WebService, procfile_env, start_workers

ENDED = {"finished", "failed", "stopped", "canceled"}
EMBED_EVERY = 5
RETRY_PAUSE = 0.1
# The client that does not wait for its jobs submits one every this many seconds.
STREAM_PAUSE = 0.02
# How long a client waits for one of its jobs to end, and the run for every job at the end.
JOB_DEADLINE = 60.0
SETTINGS = (0, 1)


@dataclass
class Answer:
    """One HTTP answer a client got (status 0: no answer at all)."""

    method: str
    sent: float
    at: float
    status: int
    json_error: bool
    replayed: bool = False

    def expected(self) -> bool:
        if self.status == 503:
            return self.json_error
        if self.method == "POST":
            return self.status == 202 or (self.status == 200 and self.replayed)
        return self.status == 200

    def describe(self) -> str:
        return f"{self.method} {self.status or 'no answer'}{'' if self.json_error else ' (not JSON)'}"


@dataclass
class Job:
    key: str
    kind: str
    job_id: str
    sent: float  # the request that was acknowledged (monotonic)
    acknowledged: float
    ended: str | None = None
    vanished: bool = False


@dataclass
class Fault:
    kind: str  # "kill" or "partition"
    at: float  # monotonic, once the signal was sent
    at_wall: float
    promoted: float = 0.0
    resumed: float = 0.0  # a partition's end: SIGCONT
    workers: float | None = None  # monotonic, every worker heartbeating on the new primary
    healed: float = 0.0  # the old primary replicates the new one


@dataclass
class Clients:
    """Client threads submitting and long-polling jobs until told to stop."""

    base: str
    keys: ClientKeys
    prefix: str
    answers: list[Answer] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    counter: Iterator[int] = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, wait: bool = True) -> None:
        """Submit jobs one after another, long-polling each to its end (`wait`) or not."""
        session = requests.Session()
        session.headers.update(self.keys.headers(session))
        while not self.stop.is_set():
            with self.lock:
                i = next(self.counter)
            job = self.submit(session, i)
            if job is not None and wait:
                self.wait(session, job)
            elif job is not None:
                time.sleep(STREAM_PAUSE)

    def _call(self, session: requests.Session, method: str, url: str, **kwargs) -> tuple[Answer, dict | None]:
        sent = time.monotonic()
        try:
            response = session.request(method, url, timeout=60, **kwargs)
        except requests.RequestException:
            answer = Answer(method, sent, time.monotonic(), 0, False)
            body = None
        else:
            try:
                body = response.json()
            except ValueError:
                body = None
            answer = Answer(
                method,
                sent,
                time.monotonic(),
                response.status_code,
                isinstance(body, dict) and ("error" in body or response.status_code < 400),
                response.headers.get("Idempotent-Replayed") == "true",
            )
        with self.lock:
            self.answers.append(answer)
        return answer, body

    def submit(self, session: requests.Session, i: int) -> Job | None:
        """POST until acknowledged (None: told to stop first)."""
        key = f"{self.prefix}-{i}"
        if i % EMBED_EVERY == 0:
            kind, body = "embed", {"id": key, "text": f"Note {i}: a record about topic {i % 17}."}
        else:
            kind, body = "log", {"message": f"bench {key}"}
        while not self.stop.is_set():
            answer, reply = self._call(
                session, "POST", f"{self.base}/jobs/{kind}", json=body, headers={"Idempotency-Key": key}
            )
            if answer.status in (200, 202) and reply is not None:
                job = Job(key, kind, reply["id"], answer.sent, answer.at)
                with self.lock:
                    self.jobs.append(job)
                return job
            time.sleep(RETRY_PAUSE)
        return None

    def wait(self, session: requests.Session, job: Job) -> None:
        deadline = time.monotonic() + JOB_DEADLINE
        while time.monotonic() < deadline:
            answer, view = self._call(session, "GET", f"{self.base}/jobs/{job.job_id}", params={"wait": 10})
            if answer.status == 404:
                job.vanished = True
                return
            if answer.status == 200 and view is not None and view["status"] in ENDED:
                job.ended = view["status"]
                return
            if answer.status != 200:
                time.sleep(RETRY_PAUSE)


@dataclass
class Outcome:
    """What one setting measured."""

    min_replicas: int
    acknowledged: int = 0
    lost: list[Job] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)
    failure_reasons: Counter = field(default_factory=Counter)
    doubled: list[Job] = field(default_factory=list)
    runs: Counter = field(default_factory=Counter)  # executions per log message (request)
    faults: list[Fault] = field(default_factory=list)
    other: Counter = field(default_factory=Counter)
    answers: int = 0
    refused: int = 0
    to_202: dict[str, list[float]] = field(default_factory=dict)
    to_workers: dict[str, list[float]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    replaced_workers: int = 0


def worker_heartbeats(node: Node) -> dict[str, float]:
    """Each registered worker's last heartbeat (Unix time) as `node` holds it."""
    client = node.client()
    try:
        names = [key.decode() for key in client.smembers("rq:workers")]
        with client.pipeline(transaction=False) as pipe:
            for key in names:
                pipe.hget(key, "last_heartbeat")
            beats = pipe.execute()
    finally:
        client.close()
    return {
        name.removeprefix("rq:worker:"): utcparse(beat.decode()).timestamp()
        for name, beat in zip(names, beats, strict=True)
        if beat is not None
    }


def worker_pids(node: Node) -> dict[str, int]:
    client = node.client()
    try:
        names = [key.decode() for key in client.smembers("rq:workers")]
        pids = [client.hget(name, "pid") for name in names]
    finally:
        client.close()
    return {
        name.removeprefix("rq:worker:"): int(pid)
        for name, pid in zip(names, pids, strict=True)
        if pid is not None
    }


def watch_workers(topology: SentinelTopology, fault: Fault, names: set[str]) -> threading.Thread:
    """A thread noting when every worker in `names` has heartbeaten on the new primary."""

    def run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with suppress(redis.RedisError, RuntimeError):
                beats = worker_heartbeats(topology.primary())
                if all(beats.get(name, 0) > fault.at_wall for name in names):
                    fault.workers = time.monotonic()
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@contextmanager
def stack(
    topology: SentinelTopology, tmp: Path, env: dict[str, str]
) -> Iterator[tuple[WebService, set[str]]]:
    """The Procfile's web, worker (2) and embedder (1) processes: (web, the workers' names)."""
    processes: list[Process] = []
    web = None
    try:
        web = WebService(env, tmp)
        processes.append(start_workers(env, tmp, count=2))
        processes.append(start_workers(env, tmp, count=1, kind="embedder"))
        wait_until(
            lambda: len(worker_pids(topology.primary())) >= 3,
            timeout=180,
            what="3 workers",
            process=processes[0],
        )
        yield web, set(worker_pids(topology.primary()))
    finally:
        for process in processes:
            process.kill()
        if web is not None:
            web.kill()


def replicas_for(min_replicas: int) -> int:
    return min_replicas + 1


def run_setting(min_replicas: int, tmp: Path, args: argparse.Namespace) -> Outcome:
    outcome = Outcome(min_replicas)
    keys = ClientKeys(args.clients + 1)
    log_file = tmp / f"jobs-{min_replicas}.log"
    faults: list[Fault] = []
    # Redis as the release check asks for REDIS_MIN_REPLICAS=N (min-replicas-to-write N), and
    # N + 1 replicas, so that a failover leaves N and writes go on while the dead node is away.
    with SentinelTopology(
        tmp / f"redis-{min_replicas}", min_replicas_to_write=min_replicas, replicas=replicas_for(min_replicas)
    ) as topology:
        env = procfile_env(
            topology.url,
            tmp,
            SEARCH_WARMUP=0,
            API_KEYS=keys.setting,
            REDIS_MIN_REPLICAS=min_replicas,
            LOG_FILE=log_file,
        )
        with stack(topology, tmp, env) as (web, names):
            pids_before = worker_pids(topology.primary())
            # The embedder loads its model on its first job: before the clock starts.
            warm = requests.post(
                web.url("/jobs/embed"),
                json={"text": "warm up"},
                headers={"Authorization": f"Bearer {keys.keys[0]}"},
                timeout=30,
            )
            warm.raise_for_status()
            web.http.headers.update(Authorization=f"Bearer {keys.keys[0]}")
            web.wait_for_status(warm.json()["id"], ENDED, timeout=180)

            clients = Clients(web.base, keys, prefix=f"m{min_replicas}")
            threads = [threading.Thread(target=clients.run, daemon=True) for _ in range(args.clients)]
            threads.append(threading.Thread(target=clients.run, args=(False,), daemon=True))
            for thread in threads:
                thread.start()
            try:
                for kind in ["kill"] * args.kills + ["partition"] * args.partitions:
                    time.sleep(args.interval)
                    faults.append(inject(topology, kind, names))
                time.sleep(args.interval)
            finally:
                clients.stop.set()
                for thread in threads:
                    thread.join(JOB_DEADLINE + 30)
            account(outcome, clients, faults, topology, log_file)
            pids_after = worker_pids(topology.primary())
            outcome.replaced_workers = len(set(pids_before.items()) - set(pids_after.items()))
            for pid in pids_before.values():
                if not psutil.pid_exists(pid):
                    outcome.replaced_workers += 1
    return outcome


def inject(topology: SentinelTopology, kind: str, names: set[str]) -> Fault:
    """Kill or freeze the primary, wait for the failover, and heal the topology."""
    old = topology.kill_primary() if kind == "kill" else topology.stop_primary()
    fault = Fault(kind, time.monotonic(), time.time())
    topology.wait_for_failover(old, timeout=60)
    fault.promoted = time.monotonic()
    watcher = watch_workers(topology, fault, names)
    if kind == "kill":
        topology.restart(old)
    else:
        topology.cont(old)
        fault.resumed = time.monotonic()
        topology.wait_replica(old, timeout=90)  # the Sentinels demote it
    fault.healed = time.monotonic()
    watcher.join()
    return fault


def account(
    outcome: Outcome, clients: Clients, faults: list[Fault], topology: SentinelTopology, log_file: Path
) -> None:
    jobs = clients.jobs
    outcome.acknowledged = len(jobs)
    outcome.answers = len(clients.answers)
    outcome.refused = sum(1 for a in clients.answers if a.status == 503)
    outcome.other = Counter(
        f"{a.describe()} ({around(a.sent, faults)})" for a in clients.answers if not a.expected()
    )

    # Every acknowledged job must end, on whichever node is primary now.
    def statuses() -> dict[str, str | None]:
        client = topology.primary().client()
        try:
            with client.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.hget(f"rq:job:{job.job_id}", "status")
                found = pipe.execute()
        finally:
            client.close()
        return {job.job_id: s.decode() if s else None for job, s in zip(jobs, found, strict=True)}

    # A job recovered as abandoned takes a heartbeat's time to end; one that is gone never will.
    deadline = time.monotonic() + JOB_DEADLINE
    while True:
        now = statuses()
        if all(status in ENDED or status is None for status in now.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    outcome.lost = [job for job in jobs if job.vanished or now[job.job_id] not in ENDED]
    outcome.failed = [job for job in jobs if now[job.job_id] == "failed"]
    client = topology.primary().client()
    try:
        for job in outcome.failed:
            meta = json.loads(client.hget(f"rq:job:{job.job_id}", "meta") or "{}")
            outcome.failure_reasons[str(meta.get("error"))[:100]] += 1
    finally:
        client.close()

    runs = Counter()
    if log_file.exists():
        for line in log_file.read_text().splitlines():
            with suppress(ValueError):
                runs[json.loads(line).get("message")] += 1
    outcome.doubled = [job for job in jobs if job.kind == "log" and runs[f"bench {job.key}"] > 1]
    outcome.runs = runs
    outcome.faults = faults

    for fault in faults:
        first = [
            a.at for a in clients.answers if a.method == "POST" and a.status == 202 and a.sent >= fault.at
        ]
        outcome.to_202.setdefault(fault.kind, []).append(min(first) - fault.at if first else float("inf"))
        moved = fault.workers - fault.at if fault.workers is not None else float("inf")
        outcome.to_workers.setdefault(fault.kind, []).append(moved)
    outcome.latencies = [
        a.at - a.sent
        for a in clients.answers
        if a.method == "POST"
        and a.status == 202
        and not any(f.at <= a.at and a.sent <= f.healed for f in faults)
    ]


def around(at: float, faults: list[Fault]) -> str:
    """The kind of fault `at` falls in (from a second before it until it healed)."""
    for fault in faults:
        if fault.at - 1 <= at <= fault.healed:
            return fault.kind
    return "no fault"


def by_fault(jobs: list[Job], faults: list[Fault]) -> str:
    if not jobs:
        return "0"
    counts = Counter(around(job.acknowledged, faults) for job in jobs)
    return f"{len(jobs)} ({', '.join(f'{kind} {n}' for kind, n in sorted(counts.items()))})"


def seconds(samples: list[float]) -> str:
    if not samples:
        return "-"
    if len(samples) == 1:
        return f"{samples[0]:.1f} s"
    return f"{median(samples):.1f} / {max(samples):.1f} s"


def print_table(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    print(
        f"failover: {args.kills} SIGKILLs and {args.partitions} SIGSTOP partition(s) of the primary, "
        f"one every {args.interval:g} s of load, {args.clients} clients"
    )
    rows = [
        ("jobs acknowledged (202)", lambda o: str(o.acknowledged)),
        ("lost (202, then gone or never ended)", lambda o: by_fault(o.lost, o.faults)),
        ("ended failed (no job here fails by itself)", lambda o: by_fault(o.failed, o.faults)),
        ("log jobs run twice", lambda o: by_fault(o.doubled, o.faults)),
        ("replicas (min-replicas-to-write)", lambda o: f"{replicas_for(o.min_replicas)} ({o.min_replicas})"),
        ("answers", lambda o: str(o.answers)),
        ("JSON 503", lambda o: str(o.refused)),
        ("other answers", lambda o: str(sum(o.other.values()))),
        ("kill -> first 202, median / max", lambda o: seconds(o.to_202.get("kill", []))),
        ("kill -> every worker on the new primary", lambda o: seconds(o.to_workers.get("kill", []))),
        ("partition -> first 202", lambda o: seconds(o.to_202.get("partition", []))),
        (
            "partition -> every worker on the new primary",
            lambda o: seconds(o.to_workers.get("partition", [])),
        ),
        ("submit p50 (no fault in progress)", lambda o: ms(median(o.latencies) if o.latencies else None)),
        ("submit p99", lambda o: ms(percentile(o.latencies, 0.99))),
        ("worker processes replaced", lambda o: str(o.replaced_workers)),
    ]
    header = "".join(f"{f'REDIS_MIN_REPLICAS={o.min_replicas}':>24}" for o in outcomes)
    print(f"  {'':46s}{header}")
    for label, figure in rows:
        print(f"  {label:46s}" + "".join(f"{figure(o):>24}" for o in outcomes))
    for o in outcomes:
        if o.other:
            print(f"  REDIS_MIN_REPLICAS={o.min_replicas} other answers: {dict(o.other)}")
        for reason, count in o.failure_reasons.items():
            print(f"  REDIS_MIN_REPLICAS={o.min_replicas} failed x{count}: {reason}")
        for label, jobs in (("lost", o.lost), ("run twice", o.doubled)):
            for job in jobs[:10]:
                fault = min(o.faults, key=lambda f, job=job: abs(f.at - job.acknowledged))
                print(
                    f"  REDIS_MIN_REPLICAS={o.min_replicas} {label}: {job.kind} job {job.job_id}, sent "
                    f"{job.sent - fault.at:+.2f} s and acknowledged {job.acknowledged - fault.at:+.2f} s "
                    f"from a {fault.kind} (promotion {fault.promoted - fault.at:+.2f} s"
                    + (f", SIGCONT {fault.resumed - fault.at:+.2f} s)" if fault.resumed else ")")
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--interval", type=float, default=4.0, help="seconds of load before each fault")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="afterward-failover-") as tmp:
        outcomes = [run_setting(setting, Path(tmp), args) for setting in SETTINGS]
    print_table(outcomes, args)
    if "redis_min_replicas" not in {f.name for f in fields(Settings)}:
        print("  (this version has no REDIS_MIN_REPLICAS setting: both columns ran the same service)")
    without, with_wait = outcomes
    p50 = median(without.latencies), median(with_wait.latencies)
    result(
        "failover: submit p50, REDIS_MIN_REPLICAS=1 vs 0",
        baseline=f"REDIS_MIN_REPLICAS=0: p50 {ms(p50[0])}, p99 {ms(percentile(without.latencies, 0.99))}",
        ours=f"REDIS_MIN_REPLICAS=1: p50 {ms(p50[1])}, p99 {ms(percentile(with_wait.latencies, 0.99))}",
        ratio=round(p50[1] / p50[0], 2),
    )
    for name, figure in (
        ("lost", lambda o: f"{by_fault(o.lost, o.faults)} of {o.acknowledged} acknowledged"),
        ("run twice", lambda o: f"{by_fault(o.doubled, o.faults)} log jobs"),
        ("kill -> first 202", lambda o: seconds(o.to_202.get("kill", []))),
    ):
        result(
            f"failover: {name}",
            baseline=f"REDIS_MIN_REPLICAS=0: {figure(without)}",
            ours=f"REDIS_MIN_REPLICAS=1: {figure(with_wait)}",
        )


if __name__ == "__main__":
    main()
