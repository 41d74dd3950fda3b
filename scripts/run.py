"""`make run`: the Procfile's processes on 127.0.0.1:$PORT, with a Redis of their own if needed.

When REDIS_URL is unset and nothing answers on localhost:6379, an embedded redis-server
starts with its data and append-only file under var/redis. Ctrl-C stops the web and
worker processes first (workers finish or give back their jobs), then Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs.connection import redacted, url_problem  # noqa: E402
from scripts.embedded_redis import EmbeddedRedis, answers  # noqa: E402

__all__ = ["choose_redis", "main", "redacted", "url_problem"]

LOCAL_REDIS = "redis://localhost:6379/0"
# The long-running process types of the Procfile (`release` is a one-off step before a deploy).
PROCESSES = ["web", "worker", "embedder"]
# honcho SIGKILLs every process 5 s after its SIGTERM: a running job gets 2 s to finish and is
# then put back in its queue, so the workers have exited cleanly by then.
HONCHO_KILL_WAIT = 5
SHUTDOWN_GRACE = 2


def choose_redis(env: dict[str, str], local: str, data_dir: Path) -> tuple[EmbeddedRedis | None, str]:
    """Set env["REDIS_URL"]: the given one, else a Redis answering at `local`, else a private one.

    Returns the private server if one was started, and a sentence saying which Redis is used.
    """
    if env.get("REDIS_URL"):
        return None, f"using REDIS_URL from the environment: {redacted(env['REDIS_URL'])}"
    if answers(local):
        env["REDIS_URL"] = local
        return None, (
            f"using a Redis that was already running at {local}, not one started by make run: "
            "jobs share its database 0 with anything else using it. Set REDIS_URL to choose another."
        )
    embedded = EmbeddedRedis(data_dir).start()
    env["REDIS_URL"] = embedded.url
    return embedded, f"started a private Redis at {embedded.url} (data in {data_dir})"


def main() -> int:
    env = dict(os.environ)
    env.setdefault("HOST", "127.0.0.1")
    env.setdefault("PORT", "5000")
    env.setdefault("WORKERS", "2")
    env.setdefault("LOG_FILE", str(ROOT / "var" / "log" / "jobs.log"))
    env.setdefault("SHUTDOWN_GRACE", str(SHUTDOWN_GRACE))
    if env["HOST"] in ("127.0.0.1", "localhost", "::1"):
        # The dashboard opens for this machine's browser; served beyond loopback, it needs a password.
        env.setdefault("DASHBOARD_OPEN", "1")
    if int(env["SHUTDOWN_GRACE"]) >= HONCHO_KILL_WAIT - 1:
        print(
            f"run: SHUTDOWN_GRACE={env['SHUTDOWN_GRACE']} is too long under honcho, which kills every "
            f"process {HONCHO_KILL_WAIT} s after Ctrl-C: a job still running then is not put back "
            "until a worker's maintenance finds it abandoned.",
            flush=True,
        )
    env["PYTHONUNBUFFERED"] = "1"
    # The Procfile names `gunicorn` and `rq`: the ones installed next to this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    given = env.get("REDIS_URL")
    problem = url_problem(given) if given else None
    if problem:
        # Stop here: every process would fail on it, and some of their errors quote the URL's parts.
        print(f"run: REDIS_URL ({redacted(given)}) is unusable: {problem}.", file=sys.stderr, flush=True)
        return 2
    embedded, message = choose_redis(env, LOCAL_REDIS, ROOT / "var" / "redis")
    print(f"run: {message}", flush=True)
    print(f"run: API on http://{env['HOST']}:{env['PORT']}", flush=True)
    release = subprocess.run([sys.executable, "-m", "scripts.release"], cwd=ROOT, env=env, check=False)
    if release.returncode != 0:
        # The release step refuses this Redis (it said why just above): a stack started on it
        # would fail, or lose jobs to eviction.
        print(
            "run: the release check (python -m scripts.release) failed; not starting web and workers.",
            file=sys.stderr,
            flush=True,
        )
        if embedded is not None:
            embedded.stop()
        return 1

    honcho = Path(sys.executable).with_name("honcho")
    process = subprocess.Popen(
        [str(honcho), "start", "--procfile", "Procfile", "--port", env["PORT"], *PROCESSES],
        cwd=ROOT,
        env=env,
    )
    stopping = []

    def stop(signum: int, frame: object) -> None:
        # Ctrl-C in a terminal reaches honcho too; a SIGTERM sent to this process alone
        # does not, so it is passed on (honcho ignores a second request to stop).
        stopping.append(signum)
        process.send_signal(signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        code = process.wait()
        return 0 if stopping else code
    finally:
        if embedded is not None:
            embedded.stop()
            print("run: embedded Redis stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
