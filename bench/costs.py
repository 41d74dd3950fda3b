"""Where a job's time goes: Redis commands, round trips and CPU per job, stock RQ and ours;
and what each of the engine's overrides of RQ saves at 1 ms RTT.

    .venv/bin/python -m bench.costs [--jobs 500] [--clients 8] [--rtt 0,1] [--path-jobs 150] [--path-rounds 2]

Every Redis client of the run connects through bench.rtt_proxy, set to each `--rtt` in turn
(milliseconds); per job, the wall time is the run's span divided by its jobs.

Stock RQ: the jobs are enqueued with `queue.enqueue` and run by a preloaded `rq worker-pool`
of 2 workers (bench.stock_worker); the bench waits by counting the finished registry twice a
second (those few commands are subtracted). That is enqueue + run, nothing else.
Afterward: the web process (2 gunicorn processes) and a worker-pool of 2 workers, every
setting at its default, API keys on; each client POSTs a log job with an API key and an
Idempotency-Key, then waits with one status request (`GET <Location>?wait=30`).

Per job: Redis commands (INFO commandstats), round trips (Redis's read events, which is what
one request or one pipeline costs it), and CPU milliseconds spent by each process type (the
client threads included), from psutil before and after.

Overrides, at `--path-rtt` (1 ms): one worker (bench.rq_paths.PathWorker: the engine's worker,
timed path by path) drains `--path-jobs` log jobs queued beforehand, once as it is and once
with each override kept for speed swapped back to RQ's own code (BENCH_RQ_CODE). For each:
the round trips (requests sent by the work loop) and milliseconds its path costs per job
(take: from one job's end to the next one's start; start: marking the job started; finish:
recording its success), and the share of the path the override saves. An override kept for
speed that saves under 10 % of its path goes back to RQ's code. The overrides that exist for
correctness are listed with the test that fails without them: they are not judged on speed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import redis
import requests
from rq import Queue

from bench.common import ClientKeys, bench_parser, env_for, result, run_clients, service
from bench.rq_paths import SWAPS, WARM_UP
from bench.rtt_proxy import RttProxy
from jobs.engine.queue import Queue as EngineQueue
from scripts.embedded_redis import EmbeddedRedis
from scripts.processes import ROOT, Process, wait_until
from scripts.stack import TestDatabase, procfile_command


def cpu_seconds(root: psutil.Process) -> float:
    """CPU time of a process and everything below it, children that ended included; for this
    (the benchmark's) process, its own time only: its client threads. The services it
    started are counted under their own names."""
    if root.pid == os.getpid():
        times = root.cpu_times()
        return times.user + times.system
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


class Meter:
    """Redis commands, read events and CPU of named process trees, between start() and stop()."""

    def __init__(self, connection: redis.Redis, processes: dict[str, Callable[[], psutil.Process]]) -> None:
        self.connection = connection
        self.processes = processes

    def _read(self) -> tuple[int, int, dict[str, float]]:
        stats = self.connection.info("stats")
        cpu = {name: cpu_seconds(find()) for name, find in self.processes.items()}
        return stats["total_commands_processed"], stats["total_reads_processed"], cpu

    def start(self) -> None:
        self._before = self._read()

    def stop(self, jobs: int, overhead: int = 0) -> dict[str, float]:
        after = self._read()
        # Each INFO read costs one command and one read event of its own.
        commands = after[0] - self._before[0] - overhead - 1
        reads = after[1] - self._before[1] - overhead - 1
        figures = {"Redis commands": commands / jobs, "Redis round trips": reads / jobs}
        for name in self.processes:
            figures[f"CPU ms, {name}"] = (after[2][name] - self._before[2][name]) * 1000 / jobs
        return figures


def stock(server: EmbeddedRedis, tmp: Path, jobs: int, proxy: RttProxy) -> dict[str, float]:
    db = TestDatabase(server.base_url).acquire()
    env = env_for(db, tmp, REDIS_URL=proxy.url(db.url))
    command = f"{sys.executable} -m bench.stock_worker worker-pool default --num-workers 2"
    pool = Process("stock", command, env, tmp / "stock.log", cwd=ROOT)
    connection = redis.Redis.from_url(proxy.url(db.url))
    try:
        wait_until(lambda: connection.scard("rq:workers") >= 2, what="stock workers", process=pool)
        queue = Queue("default", connection=connection)
        meter = Meter(
            connection,
            {
                "client": psutil.Process,
                "worker": lambda: psutil.Process(pool.pid),
                "Redis": lambda: psutil.Process(server.process.pid),
            },
        )
        time.sleep(1)  # let the workers settle into waiting
        meter.start()
        started = time.perf_counter()
        for i in range(jobs):
            queue.enqueue("jobs.types.log.write_log", message=f"job {i}")
        polls = 0
        while queue.finished_job_registry.count < jobs:
            polls += 2  # ZREMRANGEBYSCORE + ZCARD
            time.sleep(0.02)
        polls += 2
        elapsed = time.perf_counter() - started
        return {**meter.stop(jobs, overhead=polls), "wall ms": elapsed * 1000 / jobs}
    finally:
        pool.kill()
        db.release()


def afterward(server: EmbeddedRedis, tmp: Path, jobs: int, clients: int, proxy: RttProxy) -> dict[str, float]:
    db = TestDatabase(server.base_url).acquire()
    keys = ClientKeys(clients)
    env = env_for(db, tmp, API_KEYS=keys.setting, REDIS_URL=proxy.url(db.url))

    def submit_and_wait(session: requests.Session, i: int) -> None:
        headers = {**keys.headers(session), "Idempotency-Key": uuid.uuid4().hex}
        response = session.post(
            web.url("/jobs/log"), json={"message": f"job {i}"}, headers=headers, timeout=30
        )
        assert response.status_code == 202, response.text
        view = session.get(
            web.url(response.headers["Location"]), params={"wait": 30}, headers=headers, timeout=60
        )
        assert view.json()["status"] == "finished", view.text

    try:
        with service(env, tmp, workers=2) as web:
            pool = next(p for p in psutil.Process().children() if "worker-pool" in " ".join(p.cmdline()))
            run_clients(clients, min(50, jobs), submit_and_wait)  # warm up
            meter = Meter(
                redis.Redis.from_url(proxy.url(db.url)),
                {
                    "client": psutil.Process,
                    "web": lambda: psutil.Process(web.process.pid),
                    "worker": lambda: pool,
                    "Redis": lambda: psutil.Process(server.process.pid),
                },
            )
            time.sleep(1)
            meter.start()
            started = time.perf_counter()
            run_clients(clients, jobs, submit_and_wait)
            elapsed = time.perf_counter() - started
            return {**meter.stop(jobs), "wall ms": elapsed * 1000 / jobs}
    finally:
        db.release()


# The engine's overrides of RQ that exist for correctness, not speed: not judged on speed.
# (class.method(s), what it is for, the test that covers it)
CORRECTNESS = [
    (
        "Queue.dequeue_any",
        "a take that cannot lose a job (atomic move onto the intermediate list), fair share, paused queues",
        "test_faults.py::test_a_job_taken_by_a_worker_that_dies_before_starting_it_runs "
        "(test_stock_rq_loses_a_job_in_that_window shows RQ's dequeue losing it)",
    ),
    (
        "Queue.push_job_id",
        "fair share between API keys, and the wake-up signal to an idle worker",
        "test_fair_share.py::test_a_new_keys_job_waits_for_at_most_one_job_of_each_other_key, "
        "test_queue.py::test_every_push_signals_an_idle_worker",
    ),
    (
        "Queue.count, Queue.empty",
        "the jobs waiting behind their key's turn count and go too",
        "test_fair_share.py::test_emptying_a_queue_deletes_the_jobs_waiting_their_turn_too",
    ),
    (
        "Queue.intermediate_queue, IntermediateQueue.cleanup",
        "a job taken but never started is put back, not failed",
        "test_queue.py::test_rqs_maintenance_puts_a_job_back_instead_of_failing_it",
    ),
    (
        "Queue.acquire_maintenance_lock",
        "a worker dying mid-maintenance stalls recovery for a minute, not fifteen",
        "test_faults.py::test_recovery_with_the_default_intervals_is_under_a_minute",
    ),
    (
        "Queue.setup_dependencies, enqueue_job, enqueue_dependents, enqueue_ready_jobs_by_queue; "
        "Job.dependencies_are_met, cancel, _cancel_queuing_dependents",
        "dependencies inside a submission's transaction; failures cancel dependents",
        "test_dependencies.py::test_failures_cancel_dependents_transitively_and_allow_failure_runs_anyway, "
        "test_dependencies_that_ended_before_the_submit_settle_it_at_once",
    ),
    (
        "Job.__init__, func_name, func, check_registered, success/failure/stopped_callback",
        "JSON only; only registered functions and callbacks run",
        "test_jobs.py::test_job_is_json_even_when_asked_for_pickle, test_job_refuses_unregistered_functions",
    ),
    (
        "Job.to_dict, restore",
        "the owning API key is stored with the job",
        "test_security.py::test_a_job_is_visible_only_to_its_key",
    ),
    (
        "Job.delete, _leave_fair_share",
        "a deleted or canceled front job moves its key's turn on",
        "test_fair_share.py::test_canceling_or_deleting_a_front_job_moves_its_key_on",
    ),
    (
        "Job.perform, prepare_for_execution, _handle_failure",
        "attempts counted where the job is started; a final failure recorded in its own transaction",
        "test_integration.py::test_failed_attempt_is_retried_then_finishes, "
        "test_webhooks.py::test_a_retried_job_delivers_its_new_end",
    ),
    (
        "Worker.handle_job_success, handle_job_failure, push_exc_handler(_remember_error)",
        "recording ends for long polls, metrics and webhooks; errors in plain words",
        "test_webhooks.py::test_failed_stopped_and_canceled_jobs_are_delivered_too, "
        "test_faults.py::test_killed_work_horse_without_retries_fails_in_plain_words",
    ),
    (
        "Worker.kill_horse, handle_payload, request_stop, request_force_stop, setup_work_horse_signals, "
        "teardown",
        "a stop gives the running job its grace, then puts it back",
        "test_faults.py::test_sigterm_during_a_long_job_puts_it_back_within_the_grace_period, "
        "test_engine.py::test_a_stop_signal_may_interrupt_its_own_handler_anywhere",
    ),
    (
        "Worker.get_heartbeat_ttl, dequeue_timeout",
        "an abandoned job is recovered within a minute; idle workers heartbeat",
        "test_faults.py::test_killed_worker_and_horse_are_recovered_within_a_minute, "
        "test_engine.py::test_an_idle_worker_heartbeats_as_often_as_a_busy_one",
    ),
    (
        "Worker.__init__, bootstrap",
        "a worker started before Redis waits for it",
        "test_faults.py::test_a_worker_started_before_redis_waits_for_it",
    ),
    (
        "Worker.run_maintenance_tasks",
        "batches whose last end nobody announced are ended",
        "test_batch_bookkeeping.py::test_the_sweep_ends_a_batch_whose_last_end_was_not_announced_and_only_once",
    ),
    (
        "Worker._start_scheduler, Scheduler.start, work, enqueue_scheduled_jobs",
        "the scheduler dies with its worker; due jobs join their key's turn",
        "test_faults.py::test_a_killed_workers_scheduler_dies_with_it_and_readyz_counts_what_lives, "
        "test_fair_share.py::test_due_jobs_join_their_keys_turn",
    ),
]
# Kept for speed, but not swappable one method at a time: the long-lived work-horse.
WHOLE_WORKER = (
    "Worker.execute_job, wait_for_horse, horse_pid (jobs.engine.horse)",
    "a long-lived work-horse instead of a fork per job: CPU, not round trips; measured whole by "
    "bench.worker_classes (stock forking rq.Worker against ours, same jobs)",
)
# The path each swappable override belongs to, and its share of what it must save.
SAVES_AT_LEAST = 0.10


def path_costs(base_url: str, tmp: Path, proxy: RttProxy, jobs: int, swap: str, round_: int) -> Path:
    """One engine worker drains `jobs` log jobs on the Redis server at `base_url`, through the
    proxy, with `swap` (an override's name, or "") running RQ's code; returns the directory of
    its path counts (bench.rq_paths)."""
    db = TestDatabase(base_url).acquire()
    name = f"{swap or 'ours'}-{round_}"
    stats = tmp / f"paths-{name}"
    stats.mkdir()
    try:
        with db.client().pipeline() as pipe:
            queue = EngineQueue("default", connection=db.client())
            for i in range(jobs):
                queue.enqueue("jobs.types.log.write_log", message=f"job {i}", pipeline=pipe)
            pipe.execute()
        env = env_for(
            db, tmp, REDIS_URL=proxy.url(db.url), WORKERS=1, BENCH_RQ_CODE=swap, BENCH_PATH_STATS=stats
        )
        command = procfile_command("worker").replace(
            "--worker-class jobs.engine.worker.Worker", "--worker-class bench.rq_paths.PathWorker"
        )
        worker = Process("paths", command, env, tmp / f"paths-{name}.log")
        try:
            wait_until(
                lambda: queue.finished_job_registry.count >= jobs,
                timeout=600,
                what=f"{jobs} jobs ({name})",
                process=worker,
            )
            time.sleep(0.2)  # the horse writes its counts after the job's end is recorded
        finally:
            worker.kill()
        return stats
    finally:
        db.release()


def read_path_stats(directories: list[Path]) -> dict[str, float]:
    """Per job, over every process's file: `<path> RTs` (the mean) and `<path> ms` (the median
    job's), and the wall `ms` (the worker's span over its jobs)."""
    trips: dict[str, list[float]] = {}
    per_job: dict[str, list[float]] = {}
    spans = [0.0, 0]
    for file in (file for directory in directories for file in directory.glob("*.json")):
        data = json.loads(file.read_text())
        for name, (_, _, sent) in data["paths"].items():
            total = trips.setdefault(name, [0.0, 0])
            total[0] += sent
            total[1] += data["jobs"]
        for name, seconds in data["per_job"].items():
            per_job.setdefault(name, []).extend(seconds)
        if "take" in data["paths"]:  # the worker's own file: the span of its jobs
            spans[0] += data["last"] - data["first"]
            spans[1] += data["jobs"]
    figures = {"ms": spans[0] * 1000 / spans[1] if spans[1] else 0.0}
    for name, (sent, jobs) in trips.items():
        figures[f"{name} RTs"] = sent / jobs
    for name, seconds in per_job.items():
        figures[f"{name} ms"] = statistics.median(seconds) * 1000
    return figures


def overrides(server: EmbeddedRedis, tmp: Path, proxy: RttProxy, rtt: float, jobs: int, rounds: int) -> None:
    """The overrides table: each speed override against RQ's code on its path, at `rtt`."""
    proxy.set_rtt(rtt)
    runs: dict[str, list[Path]] = {swap: [] for swap in ("", *SWAPS)}
    for round_ in range(rounds):  # interleaved: a busy spell of the machine hits every variant
        for swap, directories in runs.items():
            directories.append(path_costs(server.base_url, tmp, proxy, jobs, swap, round_))
    measured = {swap: read_path_stats(directories) for swap, directories in runs.items()}
    ours = measured[""]
    print(
        f"\noverrides of RQ, at {rtt:g} ms RTT: one worker drains {jobs} log jobs (the first "
        f"{WARM_UP} not counted), as it is and with each override swapped for RQ's code, "
        f"{rounds} round(s) interleaved; per job: round trips (mean), milliseconds (median job)"
    )
    print(
        f"  whole job, ours: {ours['ms']:.2f} ms; paths: "
        + ", ".join(f"{p} {ours.get(p + ' RTs', 0):.2f} RTs {ours.get(p + ' ms', 0):.2f} ms" for p in PATHS)
    )
    print(
        "\n  | override | path | RQ's code: RTs, ms per job | ours: RTs, ms per job | saves "
        "(of the path with RQ's code) | whole job, RQ's code -> ours | verdict |"
    )
    print("  |---|---|---|---|---|---|---|")
    for swap, (path, what) in SWAPS.items():
        rq = measured[swap]
        rq_ms, ours_ms = rq.get(f"{path} ms", 0.0), ours.get(f"{path} ms", 0.0)
        saved = (rq_ms - ours_ms) / rq_ms if rq_ms else 0.0
        verdict = (
            f"stays: speed, saves {saved:.0%} of its path"
            if saved >= SAVES_AT_LEAST
            else f"under {SAVES_AT_LEAST:.0%}: back to RQ's code"
        )
        print(
            f"  | {swap} ({what}) | {path} | {rq.get(f'{path} RTs', 0):.2f}, {rq_ms:.2f} ms | "
            f"{ours.get(f'{path} RTs', 0):.2f}, {ours_ms:.2f} ms | {rq_ms - ours_ms:.2f} ms ({saved:.0%}) | "
            f"{rq['ms']:.2f} -> {ours['ms']:.2f} ms | {verdict} |"
        )
        result(
            f"costs: override {swap}, {path} path at {rtt:g} ms RTT",
            baseline=f"RQ's code: {rq.get(f'{path} RTs', 0):.2f} round trips, {rq_ms:.2f} ms per job",
            ours=f"{ours.get(f'{path} RTs', 0):.2f} round trips, {ours_ms:.2f} ms per job",
            ratio=round(ours_ms / rq_ms, 2) if rq_ms else None,
        )
    print(f"  | {WHOLE_WORKER[0]} | run | - | - | - | - | stays: speed — {WHOLE_WORKER[1]} |")
    for names, why, test in CORRECTNESS:
        print(f"  | {names} | - | - | - | - | - | stays: correctness ({why}) — {test} |")


PATHS = ("take", "start", "finish")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--rtt", type=lambda text: [float(part) for part in text.split(",")], default=[0.0, 1.0]
    )
    parser.add_argument("--path-jobs", type=int, default=150, help="jobs per override measured, a round")
    parser.add_argument("--path-rounds", type=int, default=2, help="rounds of the overrides, interleaved")
    parser.add_argument("--path-rtt", type=float, default=1.0, help="the RTT the overrides are judged at")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis", appendonly=False) as server:
        version = redis.Redis.from_url(server.url).info("server")["redis_version"]
        print(f"Redis {version}: a private redis-server, every client through bench.rtt_proxy")
        with RttProxy(server.port) as proxy:
            for rtt in args.rtt:
                proxy.set_rtt(rtt)
                baseline = stock(server, Path(tmp), args.jobs, proxy)
                ours = afterward(server, Path(tmp), args.jobs, args.clients, proxy)
                rows.append((rtt, baseline, ours))
            for rtt, baseline, ours in rows:
                print(
                    f"\nper log job at {rtt:g} ms RTT, {args.jobs} jobs ({args.clients} clients for "
                    f"Afterward), 2 worker processes each"
                )
                print(f"  {'':26s} {'stock RQ: enqueue + run':>26s} {'Afterward: POST + one wait':>28s}")
                for name in sorted(set(baseline) | set(ours), key=lambda n: (not n.startswith("Redis"), n)):
                    stock_value = f"{baseline[name]:.1f}" if name in baseline else "-"
                    ours_value = f"{ours[name]:.1f}" if name in ours else "-"
                    print(f"  {name:26s} {stock_value:>26s} {ours_value:>28s}")
            print(
                "  (wall ms: the run's span over its jobs; stock's enqueues come from one client thread, "
                "Afterward's from its clients)"
            )
            overrides(server, Path(tmp), proxy, args.path_rtt, args.path_jobs, args.path_rounds)
    _, baseline, ours = rows[0]
    cpu = {
        name.removeprefix("CPU ms, "): value for name, value in ours.items() if name.startswith("CPU ms, ")
    }
    stock_cpu = sum(value for name, value in baseline.items() if name.startswith("CPU ms, "))
    result(
        "costs: CPU ms per job, every process",
        baseline=f"stock enqueue + run: {stock_cpu:.1f}",
        ours=f"{sum(cpu.values()):.1f} ("
        + ", ".join(f"{name} {value:.1f}" for name, value in sorted(cpu.items()))
        + ")",
        ratio=round(sum(cpu.values()) / stock_cpu, 2) if stock_cpu else None,
    )
    for name in ("Redis commands", "Redis round trips"):
        result(
            f"costs: {name} per job",
            baseline=f"stock enqueue + run: {baseline[name]:.1f}",
            ours=f"{ours[name]:.1f} (POST + one wait, keys, limits, idempotency)",
            ratio=round(ours[name] / baseline[name], 2),
        )


if __name__ == "__main__":
    main()
