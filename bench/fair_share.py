"""Fair share: one API key alone against the same load spread over many keys.

    .venv/bin/python -m bench.fair_share [--jobs 300] [--log-jobs 2000] [--documents 1000]
                                         [--clients 16] [--rounds 2]

Each of `--clients` client threads submits a job and long-polls it (`?wait=30`) until it ends,
then submits the next, through the Procfile's web process. Run once with one API key that
every client shares (one backend calling the service, the common deployment) and once with
an API key per client (the baseline: the same load spread over many keys). A fair share that
is a cap, not a share, holds a lone key below the workers it could use; a share lends it
every idle worker. Target: one key >= 0.95x many keys, for each of:

  - `sleep` jobs of 0.2 s on 2 workers (the load is the workers': at most 10 jobs/s);
  - `log` jobs on 2 workers (the load is the service's own overhead per job);
  - single-document `embed` jobs on one embed worker (each batch filled from what waits).

Every setting at its default but RATE_LIMIT, which is off in both runs of the `log` and
`embed` rows: it counts requests per key, by design, so with it on 16 clients sharing a key
would be measuring the rate limit (6,000 a minute), not how workers are shared. Each side
runs `--rounds` times, in turns, and its best run counts.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import requests

from bench.common import ClientKeys, bench_parser, database, env_for, median, ms, result, run_clients, service

TERMINAL = {"finished", "failed", "canceled", "stopped"}


def run(db, tmp: Path, keys: int, clients: int, jobs: int, type_name: str, body, kind: str, **env) -> tuple:
    """Jobs a second, and each job's POST -> finished latency, with `keys` API keys in use."""
    client_keys = ClientKeys(keys)
    environment = env_for(db, tmp, API_KEYS=client_keys.setting, **env)

    def submit_and_wait(session: requests.Session, i: int) -> None:
        headers = client_keys.headers(session)
        response = session.post(web.url(f"/jobs/{type_name}"), json=body(i), headers=headers, timeout=30)
        assert response.status_code == 202, response.text
        location = web.url(response.headers["Location"])
        while True:
            view = session.get(location, params={"wait": 30}, headers=headers, timeout=60).json()
            if view["status"] in TERMINAL:
                assert view["status"] == "finished", view
                return

    workers = 1 if kind == "embedder" else 2
    with service(environment, tmp, workers=workers, kind=kind) as web:
        run_clients(clients, min(jobs, 2 * clients), submit_and_wait)  # warm up (the model, the scripts)
        started = time.perf_counter()
        latencies = run_clients(clients, jobs, submit_and_wait)
        rate = jobs / (time.perf_counter() - started)
    db.flush()
    return rate, latencies


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=300, help="sleep jobs per run")
    parser.add_argument("--log-jobs", type=int, default=2000)
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, the best counted")
    args = parser.parse_args()
    rows = [
        ("fair share: 0.2 s jobs", args.jobs, "sleep", lambda i: {"seconds": 0.2}, "worker", {}),
        (
            "fair share: log jobs",
            args.log_jobs,
            "log",
            lambda i: {"message": f"job {i}"},
            "worker",
            {"RATE_LIMIT": "off"},
        ),
        (
            "fair share: single-document embeds",
            args.documents,
            "embed",
            lambda i: {"text": f"Note {i}: a short text about rivers, gardens and copper lanterns."},
            "embedder",
            {"RATE_LIMIT": "off"},
        ),
    ]
    print(f"{args.clients} clients, each waiting for its job before the next; one key for all, then one each")
    with database(args.redis) as db, tempfile.TemporaryDirectory() as tmp:
        for name, jobs, type_name, body, kind, env in rows:
            # The best of `--rounds` runs each, in turns (many, one, one, many, ...): the machine's
            # drift favours neither side.
            runs: dict[int, list[tuple[float, list[float]]]] = {args.clients: [], 1: []}
            for round_ in range(args.rounds):
                for keys in (args.clients, 1) if round_ % 2 == 0 else (1, args.clients):
                    runs[keys].append(
                        run(db, Path(tmp), keys, args.clients, jobs, type_name, body, kind, **env)
                    )
            many, many_latencies = max(runs[args.clients], key=lambda measured: measured[0])
            one, one_latencies = max(runs[1], key=lambda measured: measured[0])
            print(
                f"  {name:36s} one key {one:7.1f} jobs/s (p50 {ms(median(one_latencies))}), "
                f"{args.clients} keys {many:7.1f} jobs/s (p50 {ms(median(many_latencies))}): "
                f"{one / many:.2f}x"
            )
            result(
                name,
                baseline=f"{args.clients} keys, one per client: {many:.1f} jobs/s",
                ours=f"one key for all {args.clients} clients: {one:.1f} jobs/s",
                ratio=round(one / many, 2),
            )


if __name__ == "__main__":
    main()
