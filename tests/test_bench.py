"""Every benchmark runs once at a tiny size, through the script that writes BENCHMARKS.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.report import BENCHMARKS
from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.bench]


@pytest.mark.timeout(900)
def test_every_benchmark_runs_and_the_report_is_built(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench.report", "--tiny", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = output.read_text()
    for module, _, targets, *_ in BENCHMARKS:
        assert f"## {module}" in report
        for name in targets:
            row = next((line for line in report.splitlines() if line.startswith(f"| {name} |")), None)
            assert row is not None, f"{module} printed no result for {name}"
            assert "x**" in row or name == "longpoll", row
