"""Every benchmark runs once at a tiny size, so none can rot. Their figures are in BENCHMARKS.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.bench]

TINY = [
    ("bench.worker_classes", ["--jobs", "40"], "x stock"),
    ("bench.longpoll", ["--pollers", "5", "--seconds", "0.5"], "ratio"),
    ("bench.e2e_log", ["--jobs", "60"], "x stock"),
    ("bench.enqueue", ["--requests", "100", "--clients", "4"], "x the naive throughput"),
    ("bench.embed", ["--documents", "40", "--clients", "4"], "x raw"),
    ("bench.index", ["--documents", "2000", "--repeat", "3"], "in-process"),
    ("bench.latency", ["--samples", "5"], "POST -> finished"),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("module", "args", "expected"), TINY, ids=[t[0] for t in TINY])
def test_benchmark_runs(module, args, expected):
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert expected in result.stdout
