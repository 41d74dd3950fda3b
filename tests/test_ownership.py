"""Nothing a test starts outlives the run: a nested pytest is interrupted, or leaks, on purpose."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests import ownership
from tests.support import ROOT, Process, wait_until

# Started by the nested run: a Procfile-style process whose child leaves its process group
# and session (as RQ's work-horses leave their worker's group), then it waits for a signal.
NESTED_TEST = """
import os
import time
from pathlib import Path

from tests.support import Process


def test_holds_processes(tmp_path):
    command = "bash -c 'setsid sleep 1000 & sleep 1000'"
    process = Process("holder", command, dict(os.environ), tmp_path / "log")
    Path(os.environ["STARTED_FILE"]).write_text(str(process.pid))
    time.sleep(1000)
"""

LEAKING_TEST = """
import subprocess


def test_forgets_a_process():
    subprocess.Popen(["sleep", "1000"], start_new_session=True)
"""


def nested_pytest(tmp_path: Path, source: str) -> subprocess.Popen:
    """pytest on one test file, with this suite's conftest, in a process of its own."""
    test_file = tmp_path / "test_nested.py"
    test_file.write_text(textwrap.dedent(source))
    env = {**os.environ, "STARTED_FILE": str(tmp_path / "started")}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "tests.conftest",
        "-p",
        "no:cacheprovider",
        str(test_file),
    ]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_of(pid: int) -> list[psutil.Process]:
    """Live processes started by the pytest run with this pid."""
    found = []
    for process in psutil.process_iter():
        try:
            token = process.environ().get(ownership.RUN_VAR, "")
            if token.startswith(f"{pid}:") and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_leaves_nothing_running(tmp_path, sig):
    runner = nested_pytest(tmp_path, NESTED_TEST)
    try:
        holder = int(
            wait_until(lambda: (tmp_path / "started").exists() and (tmp_path / "started").read_text())
        )
        wait_until(lambda: len(run_of(runner.pid)) >= 3, what="the holder, its child and its escapee")
        escaped = [p for p in run_of(runner.pid) if os.getsid(p.pid) != os.getsid(holder)]
        assert escaped, "the escapee is in a session of its own"
        runner.send_signal(sig)
        output, _ = runner.communicate(timeout=120)
        assert runner.returncode != 0
        assert run_of(runner.pid) == [], output
        assert not psutil.pid_exists(holder) or psutil.Process(holder).status() == psutil.STATUS_ZOMBIE
    finally:
        runner.kill()
        ownership.kill(run_of(runner.pid))


def test_a_run_that_leaks_a_process_fails_and_kills_it(tmp_path):
    runner = nested_pytest(tmp_path, LEAKING_TEST)
    try:
        output, _ = runner.communicate(timeout=120)
        assert "1 passed" in output
        assert "outlived their tests" in output and "sleep 1000" in output, output
        assert runner.returncode == 1
        assert run_of(runner.pid) == []
    finally:
        runner.kill()
        ownership.kill(run_of(runner.pid))


def test_stopping_a_process_kills_children_that_left_its_group(tmp_path):
    process = Process(
        "parent", "bash -c 'setsid sleep 1000 & sleep 1000'", dict(os.environ), tmp_path / "log"
    )

    def escapees() -> list[psutil.Process]:
        return [p for p in ownership.tagged(process.tag) if os.getpgid(p.pid) != process.pid]

    escapee = wait_until(escapees, what="the child in its own group")
    process.kill()
    assert not escapee[0].is_running() or escapee[0].status() == psutil.STATUS_ZOMBIE
    assert ownership.tagged(process.tag) == []
