"""Every benchmark runs once at a tiny size, through the script that writes BENCHMARKS.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.report import _SPLIT, BENCHMARKS, NOTES, update
from tests.support import ROOT


@pytest.mark.integration
@pytest.mark.bench
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


def test_one_benchmark_measured_again_replaces_its_rows_and_section_and_keeps_the_rest():
    report = (
        "# Benchmarks\n\n## Summary\n\n"
        "| Benchmark | Baseline | Afterward | Ratio | Target |\n|---|---|---|---|---|\n"
        "| a | 1 | 2 | **2.0x** | |\n| b | 1 | 1 | **1.0x** | |\n\n"
        "## bench.a\n\nold a\n\n## bench.b\n\nold b\n"
    )
    rows = "| b | 1 | 3 | **3.0x** | |\n| c | 1 | 4 | **4.0x** | |\n"
    measured = rows + _SPLIT + _SPLIT + "## bench.b\n\nnew b\n"
    updated = update(report, measured)
    rows = [line for line in updated.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| a | 1 | 2 | **2.0x** | |", "| b | 1 | 3 | **3.0x** | |", "| c | 1 | 4 | **4.0x** | |"]
    assert "old a" in updated and "new b" in updated and "old b" not in updated
    assert updated.index("## bench.a") < updated.index("## bench.b")


def test_a_benchmark_measured_again_replaces_its_notes_and_keeps_the_others():
    report = (
        "# Benchmarks\n\n## Summary\n\n"
        "| Benchmark | Baseline | Afterward | Ratio | Target |\n|---|---|---|---|---|\n"
        "| a | 1 | 2 | **2.0x** | |\n| b | 1 | 1 | **1.0x** | |\n| c | 1 | 1 | **1.0x** | |"
        + NOTES
        + "- a: old note on a\n- b: old note on b\n- c: old note on c\n\n"
        "## bench.a\n\nold a\n"
    )
    # b is met now (no note); c has a new one.
    rows = "| b | 1 | 3 | **3.0x** | |\n| c | 1 | 4 | **4.0x** | |\n"
    measured = rows + _SPLIT + "- c: new note on c" + _SPLIT
    updated = update(report, measured)
    notes = updated.split(NOTES)[1].split("\n\n")[0].splitlines()
    assert notes == ["- a: old note on a", "- c: new note on c"]
    assert "\n\n## bench.a\n" in updated
    # With no note left, the heading goes too.
    cleared = update(updated, "| a | 1 | 2 | **2.0x** | |\n| c | 1 | 4 | **4.0x** | |\n" + _SPLIT + _SPLIT)
    assert NOTES.strip() not in cleared and "| c | 1 | 4 | **4.0x** | |\n\n## bench.a" in cleared
