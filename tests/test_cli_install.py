"""`make run` installs the `afterward` command line into the virtualenv it makes."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support import ROOT

VENV = ROOT / ".venv"


def fresh_environment() -> dict[str, str]:
    """This one, as a shell that has activated no virtualenv has it."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    return env


@pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="needs the checkout's .venv")
def test_make_run_installs_the_command_line(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The pinned requirements are those of the checkout's .venv (seen through a .pth file), so
    # that pip has nothing to fetch but what `make run` adds: the client in ./client.
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    shared = Path(sysconfig.get_path("purelib", vars={"base": str(VENV), "platbase": str(VENV)}))
    (site / "checkout-venv.pth").write_text(f"{shared.resolve()}\n")

    def make(*args: str) -> str:
        done = subprocess.run(
            ["make", f"VENV={venv}", *args],
            cwd=ROOT,
            env=fresh_environment(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    planned = make("-n", "run").splitlines()
    assert planned[-1] == f"{venv}/bin/python scripts/run.py"
    assert any(
        f"{venv}/bin/python -m pip install" in line and "-r requirements.txt" in line for line in planned
    )
    make(f"{venv}/.runtime")  # what `make run` does before it starts the stack
    assert make("-n", "run").splitlines() == [f"{venv}/bin/python scripts/run.py"]

    afterward = venv / "bin" / "afterward"
    helped = subprocess.run(
        [str(afterward), "--help"], env=fresh_environment(), capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: afterward") and "submit" in helped.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import afterward_client; print(afterward_client.__file__)"],
        env=fresh_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site), "installed into the new virtualenv"

    # Changed (make's "what if" -W), the client is installed again at the next `make run`.
    for changed in ("client/pyproject.toml", "client/afterward_client/cli.py"):
        assert "-r requirements.txt" in make("-n", "-W", changed, "run")


@pytest.mark.skipif(not (VENV / "bin" / "afterward").exists(), reason="needs the checkout's .venv")
def test_the_checkouts_afterward_runs():
    helped = subprocess.run(
        [str(VENV / "bin" / "afterward"), "--help"],
        env=fresh_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0, helped.stderr
    assert "AFTERWARD_API_KEY" in helped.stdout
