"""The README's by-hand Procfile command, as written, from a shell with no virtualenv activated:
the stack serves, and Ctrl-C stops all of it with clean output."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
from collections.abc import Iterator

import pytest
import redis
import requests

from scripts.embedded_redis import EmbeddedRedis, free_port
from tests import ownership
from tests.support import ROOT, Process, serves, wait_until
from tests.test_runners import CRASH_SIGNS, ORT_CI_VARIABLES

pytestmark = pytest.mark.integration

VENV_BIN = ROOT / ".venv" / "bin"
# What the output may not hold after Ctrl-C: a crash on the way out, a process honcho had to
# kill, a command the shell could not find.
UNCLEAN = (*CRASH_SIGNS, "SIGKILL", "not found")


def sh_block(page: str, heading: str) -> str:
    """The first ```sh block under the `## heading` (or `### heading`) of a page, as written."""
    text = (ROOT / page).read_text()
    section = re.split(rf"^#+ {re.escape(heading)}$", text, maxsplit=1, flags=re.MULTILINE)[1]
    found = re.search(r"^```sh\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    assert found, f"no sh block under {heading!r} in {page}"
    return found.group(1)


def test_deploying_shows_the_readmes_command():
    heading = "Running the Procfile by hand"
    assert sh_block("docs/deploying.md", heading) == sh_block("README.md", heading)


def unactivated_environment() -> dict[str, str]:
    """This process's environment as a fresh shell has it: no virtualenv on PATH or activated."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PORT", "HOST", "SHUTDOWN_GRACE")
        and not k.startswith(("REDIS_", "WEB_", "LONG_POLL"))
    }
    venv = {str(VENV_BIN), str(VENV_BIN.resolve())}
    env["PATH"] = os.pathsep.join(
        entry for entry in env.get("PATH", "").split(os.pathsep) if entry and entry not in venv
    )
    for name in ORT_CI_VARIABLES:  # as on a developer's machine (tests/test_runners.py)
        env.pop(name, None)
    return env


@pytest.fixture
def private_redis(tmp_path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis", appendonly=False) as server:
        yield server


@pytest.mark.skipif(not (VENV_BIN / "honcho").exists(), reason="needs the checkout's .venv")
def test_the_readmes_by_hand_command_serves_and_stops_cleanly_on_ctrl_c(private_redis, tmp_path):
    block = sh_block("README.md", "Running the Procfile by hand")
    env = unactivated_environment()
    for program in ("honcho", "gunicorn", "rq"):  # only the block's PATH finds them
        found = shutil.which(program, path=env["PATH"])
        assert found is None or not found.startswith(str(ROOT)), found
    port = free_port()
    env.update(REDIS_URL=private_redis.url, PORT=str(port), LOG_FILE=str(tmp_path / "jobs.log"))
    # The block as a shell runs it pasted in, in a session of its own: Ctrl-C is the terminal's
    # SIGINT to the whole foreground process group.
    process = Process("by-hand", f"bash -c {shlex.quote(block)}", env, tmp_path / "by-hand.log")
    client = redis.Redis.from_url(private_redis.url)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: serves(process, port, base + "/healthz"), what="the web process", process=process)
        wait_until(  # its model loaded (SEARCH_WARMUP=1, the default) before gunicorn forked
            lambda: requests.get(base + "/readyz", timeout=10).status_code == 200,
            what="the web process to be ready",
            process=process,
        )
        # A worker and an embedder, each the Procfile's `rq worker-pool`, found on PATH.
        wait_until(lambda: client.scard("rq:workers") >= 3, what="the workers", process=process)
        for job_type, body in (("log", {"message": "by hand"}), ("embed", {"text": "run by hand"})):
            job = requests.post(f"{base}/jobs/{job_type}", json=body, timeout=30).json()
            view = requests.get(f"{base}/jobs/{job['id']}", params={"wait": 60}, timeout=90).json()
            assert view["status"] == "finished", (view, process.output()[-3000:])

        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        code = process.popen.wait(timeout=60)
        output = process.output()
        for sign in UNCLEAN:
            assert sign not in output, output[-4000:]
        assert ownership.tagged(process.tag) == [], "a process outlived Ctrl-C"
        assert code == 128 + signal.SIGINT, output[-2000:]  # honcho's status for the Ctrl-C it got
        assert client.scard("rq:workers") == 0
    finally:
        process.kill()
        client.close()
