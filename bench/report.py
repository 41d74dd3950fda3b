"""Run every benchmark and write BENCHMARKS.md from what they print.

    .venv/bin/python -m bench.report [--output BENCHMARKS.md] [--tiny] [--only bench.x …]

Each benchmark runs in a process of its own, at its default size (`--tiny`: the sizes the
test suite uses, to check that the report can be built). The summary table is made of the
`RESULT` lines the benchmarks print; below it, each benchmark's whole output. `--only` runs
the benchmarks named and puts their rows and sections into the report as it stands, each
section dated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import import_module
from pathlib import Path

import rq

from scripts.processes import ROOT

# Module, its tiny arguments (or a list of them, for several tiny runs), the targets its results
# are held to (">=" or "<=", ratio), and the arguments of each full-size run (one run at its
# default sizes unless said).
BENCHMARKS = [
    (
        "bench.e2e_log",
        ["--jobs", "60", "--rtt", "0,1", "--idle", "10"],
        {
            "e2e_log": (">=", 5.0),
            "e2e_log vs HTTP ceiling": (">=", 0.6),
            "e2e_log at 1 ms RTT, one API key": (">=", 3.0),
            "e2e_log at 1 ms RTT, a key per client": (">=", 3.0),
            "e2e_log: Afterward at 1 ms RTT vs 0 ms, one API key": (">=", 0.8),
            "e2e_log: Afterward at 1 ms RTT vs 0 ms, a key per client": (">=", 0.8),
            "e2e_log idle POST -> finished p50 at 0 ms RTT": ("<=", 1.0),
            "e2e_log idle POST -> finished p50 at 1 ms RTT": ("<=", 1.0),
        },
    ),
    ("bench.worker_classes", ["--jobs", "40"], {"worker_classes": (">=", 1.0)}),
    (
        "bench.costs",
        ["--jobs", "40", "--clients", "4", "--rtt", "0,1", "--path-jobs", "30"],
        {
            "costs: CPU ms per job, every process": ("<=", 1.0),
            "costs: Redis commands per job": ("<=", 1.0),
            "costs: Redis round trips per job": ("<=", 1.0),
            # An override kept for speed saves at least 10 % of its path at 1 ms RTT.
            "costs: override heartbeat, take path at 1 ms RTT": ("<=", 0.9),
            "costs: override check_for_suspension, take path at 1 ms RTT": ("<=", 0.9),
            "costs: override set_state, take path at 1 ms RTT": ("<=", 0.9),
            "costs: override start, start path at 1 ms RTT": ("<=", 0.9),
            "costs: override finish, finish path at 1 ms RTT": ("<=", 0.9),
        },
    ),
    ("bench.enqueue", ["--requests", "100", "--clients", "4"], {"enqueue": (">=", 0.8)}),
    (
        "bench.embed",
        ["--documents", "40", "--clients", "4,1", "--one-client-documents", "10"],
        {
            "embed_single": (">=", 0.7),
            "embed_single onnx": (">=", 1.0),
            "embed_single vs synchronous endpoint": (">=", 1.0),
            "embed_bulk": (">=", 0.9),
        },
        [["--rtt", "0,1"]],
    ),
    (
        "bench.embed_backends",
        ["--documents", "200", "--queries", "10", "--repeat", "1"],
        {"embed_backend onnx": (">=", 1.0)},
    ),
    (
        "bench.index",
        [
            ["--documents", "2000", "--repeat", "3"],
            ["--documents", "3000", "--repeat", "3", "--exact-up-to", "1000"],
            ["--documents", "3000", "--repeat", "3", "--exact-up-to", "1000", "--keys", "10"],
        ],
        {
            "index search": ("<=", 1.5),
            "index search, HNSW": ("<=", 1.0),
            "index recall@10": (">=", 0.95),
            "index search, one key's documents": ("<=", 1.0),
            "index recall@10, one key's documents": (">=", 0.95),
        },
        [[], ["--documents", "1000000"], ["--documents", "1000000", "--keys", "100"]],
    ),
    (
        "bench.memory",
        ["--documents", "500", "--concurrency", "1,4"],
        {
            "web memory, 4 processes vs 1": ("<=", 1.5),
            "web memory, one process without shared snapshot pages": ("<=", 1.0),
        },
        [["--documents", "0,100000,1000000"]],
    ),
    (
        "bench.fair_share",
        ["--jobs", "20", "--log-jobs", "40", "--documents", "20", "--clients", "4", "--rounds", "1"],
        {
            "fair share: 0.2 s jobs": (">=", 0.95),
            "fair share: log jobs": (">=", 0.95),
            "fair share: single-document embeds": (">=", 0.95),
        },
    ),
    (
        "bench.operators",
        ["--failed", "2000", "--calls", "40", "--clients", "4"],
        {
            "operators: GET /queues": ("<=", 1.0),
            "operators: POST /jobs/retry": ("<=", 1.0),
            "operators: Redis PING during the calls": ("<=", 1.0),
        },
    ),
    (
        "bench.failover",
        ["--kills", "1", "--partitions", "0", "--clients", "2", "--interval", "2"],
        {"failover: submit p50, REDIS_MIN_REPLICAS=1 vs 0": ("<=", 1.5)},
    ),
    ("bench.latency", ["--samples", "5"], {}),
    ("bench.longpoll", ["--pollers", "5", "--seconds", "0.5"], {"longpoll": None}),
    (
        "bench.webhooks",
        ["--jobs", "60", "--hogs", "1"],
        {
            "webhooks: job end -> delivery": ("<=", 1.0),
            "webhooks: job end -> delivery, CPU hogs": ("<=", 1.0),
        },
    ),
    ("bench.batches", ["--jobs", "200", "--clients", "2"], {"batches": (">=", 2.0)}),
]


def _runs(args: list) -> list[list[str]]:
    return args if args and isinstance(args[0], list) else [args]


def verdict(target: tuple[str, float] | None, ratio: float | None) -> str:
    if target is None or ratio is None:
        return ""
    op, value = target
    met = ratio >= value if op == ">=" else ratio <= value
    return f"{op} {value:g}x, {'met' if met else 'not met'}"


INTRO = """\
# Benchmarks

Every benchmark measures its baseline and Afterward in the same run, on the same machine,
and prints the ratio: absolute figures drift on a shared machine, ratios much less. The
baselines run at their best documented configuration: stock RQ with the job's module
imported before its workers fork (`bench/stock_worker.py`, as RQ's docs advise), RQ's
`SimpleWorker` beside it, the raw model at whichever thread count is faster. Afterward runs
as its users run it: clients with API keys, rate limits on, every limit at its default,
clients long-polling their jobs' status URLs. A percentile is printed only where at least
ten samples lie beyond it (`n/a` otherwise). Each benchmark starts a private `redis-server`
unless given `--redis URL`.

This file is written by `.venv/bin/python -m bench.report` from the benchmarks' own output;
nothing in it is typed by hand. Each section says how to run that benchmark alone.
"""


def run(module: str, args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise SystemExit(f"{module} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return completed.stdout


def machine() -> str:
    cores = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{datetime.now(UTC):%Y-%m-%d}, {cores} cores, {memory:.0f} GiB, Python {platform.python_version()}, "
        f"RQ {rq.__version__}"
    )


def build(tiny: bool, only: list[str] | None = None) -> str:
    rows, sections, notes = [], [], []
    runs = [
        (module, args, targets)
        for module, tiny_args, targets, *full in BENCHMARKS
        for args in (_runs(tiny_args) if tiny else full[0] if full else [[]])
        if not only or module in only
    ]
    for module, args, targets in runs:
        output = run(module, args)
        printed = [line for line in output.splitlines() if not line.startswith("RESULT ")]
        for line in output.splitlines():
            if line.startswith("RESULT "):
                figures = json.loads(line.removeprefix("RESULT "))
                name = figures.pop("benchmark")
                baseline = figures.pop("baseline", "")
                simple = figures.pop("simple", "")
                ceiling = figures.pop("ceiling", "")
                ours = figures.pop("ours", "")
                ratio = figures.pop("ratio", None)
                if note := figures.pop("note", ""):
                    notes.append(f"- {name}: {note}")
                baselines = "<br>".join(part for part in (baseline, simple, ceiling) if part)
                ratio_text = f"**{ratio}x**" if ratio is not None else ""
                rows.append(
                    f"| {name} | {baselines} | {ours} | {ratio_text} | {verdict(targets.get(name), ratio)} |"
                )
        doc = (import_module(module).__doc__ or "").strip()
        command = f"`.venv/bin/python -m {module}{' ' + ' '.join(args) if args else ''}`"
        dated = f" (measured {machine()})" if only else ""
        sections.append(
            f"## {module}\n\n{command}{dated}\n\n```text\n{doc}\n```\n\n```text\n"
            + "\n".join(printed)
            + "\n```\n"
        )
    if only:
        return "\n".join(rows) + "\n" + _SPLIT + "\n".join(notes) + _SPLIT + "\n".join(sections)
    table = "| Benchmark | Baseline | Afterward | Ratio | Target |\n|---|---|---|---|---|\n" + "\n".join(rows)
    size = "tiny sizes (a check that the report builds)" if tiny else "default sizes"
    noted = NOTES + "\n".join(notes) if notes else ""
    summary = f"{INTRO}\nMeasured {machine()}, at {size}.\n\n## Summary\n\n{table}{noted}\n\n"
    return summary + "\n".join(sections)


_SPLIT = "\n<!-- sections -->\n"
NOTES = "\n\nWhat the measurements say about targets not met:\n\n"


def update(report: str, measured: str) -> str:
    """`report` with the rows, notes and sections of `measured` (from `build(only=…)`) in
    place of theirs: a row by its benchmark's name, a section by its heading, new ones at the
    end; a note goes with its row's name, so a row measured again keeps only its new note."""
    rows, notes, sections = measured.split(_SPLIT)
    names = {row.split("|")[1].strip() for row in rows.splitlines()}
    report = _renote(report, names, [note for note in notes.splitlines() if note])
    lines = report.splitlines()
    table_end = max(i for i, line in enumerate(lines) if line.startswith("| ")) + 1
    for row in rows.splitlines():
        name = row.split("|")[1]
        at = next((i for i, line in enumerate(lines) if line.split("|")[1:2] == [name]), None)
        if at is None:
            lines.insert(table_end, row)
            table_end += 1
        else:
            lines[at] = row
    text = "\n".join(lines) + "\n"
    for section in sections.split("\n## ") if sections.strip() else []:
        section = section if section.startswith("## ") else "## " + section
        heading = section.splitlines()[0]
        start = text.find("\n" + heading + "\n")
        if start < 0:
            text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
            continue
        end = text.find("\n## ", start + 1)
        end = len(text) if end < 0 else end
        text = text[: start + 1] + section.rstrip("\n") + "\n" + text[end:]
    return text


def _renote(report: str, names: set[str], notes: list[str]) -> str:
    """`report` whose summary notes on the benchmarks `names` are replaced by `notes`."""
    first_section = report.find("\n## ", report.find("## Summary"))
    head, rest = report[:first_section], report[first_section:]
    table, _, old = head.partition(NOTES.strip("\n"))
    kept = [
        note
        for note in old.strip("\n").splitlines()
        if note and note.removeprefix("- ").split(": ", 1)[0] not in names
    ]
    kept += notes
    return table.rstrip("\n") + (NOTES + "\n".join(kept) if kept else "") + "\n" + rest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--tiny", action="store_true", help="the test suite's sizes")
    parser.add_argument("--only", nargs="+", metavar="MODULE", help="run these, keep the rest of the report")
    args = parser.parse_args()
    if args.only:
        unknown = set(args.only) - {module for module, *_ in BENCHMARKS}
        if unknown:
            raise SystemExit(f"no such benchmark: {', '.join(sorted(unknown))}")
        args.output.write_text(update(args.output.read_text(), build(args.tiny, args.only)))
    else:
        args.output.write_text(build(args.tiny))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
