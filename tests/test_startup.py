"""Starting against a Redis that cannot be used: one clear line and a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from scripts.embedded_redis import EmbeddedRedis, free_port
from tests.support import ROOT, base_env, procfile_command

pytestmark = pytest.mark.integration


def run(command: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    # `exec`: the command is the shell's only child, and it ends (or is killed) with the run.
    return subprocess.run(
        ["bash", "-c", f"exec {command}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("url", ["notaurl", "redis://cache.internal:notaport/0"])
@pytest.mark.parametrize("process", ["web", "worker", "embedder", "release", "make run"])
def test_a_malformed_redis_url_is_one_line(process, url, tmp_path):
    env = base_env(url, tmp_path, PORT=free_port(), WORKERS=1, EMBED_WORKERS=1, SEARCH_WARMUP=0)
    command = f"{sys.executable} scripts/run.py" if process == "make run" else procfile_command(process)
    done = run(command, env)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if "REDIS_URL" in line]
    assert "is unusable" in line
    if process != "make run":  # make run says which Redis it uses before honcho starts anything
        assert output == line


def test_make_run_stops_when_the_release_check_fails(tmp_path):
    with EmbeddedRedis(tmp_path / "lru", None, False, "--maxmemory-policy", "allkeys-lru") as lru:
        port = free_port()
        env = base_env(lru.url, tmp_path, HOST="127.0.0.1", PORT=port, WORKERS=1, SEARCH_WARMUP=0)
        done = run(f"{sys.executable} scripts/run.py", env)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "noeviction" in done.stderr
        assert "the release check (python -m scripts.release) failed" in done.stderr
        assert "honcho" not in done.stdout and "web.1" not in done.stdout, "nothing was started"
        assert redis.Redis.from_url(lru.url).scard("rq:workers") == 0
