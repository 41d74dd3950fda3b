"""`make run`: the Procfile's processes on 127.0.0.1:$PORT, with a Redis of their own if needed.

When REDIS_URL is unset and nothing answers on localhost:6379, an embedded redis-server
starts with its data and append-only file under var/redis. Ctrl-C stops the web and
worker processes first (workers finish or give back their jobs), then Redis.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.connection import parse_url  # noqa: E402

from scripts.embedded_redis import EmbeddedRedis, answers  # noqa: E402

LOCAL_REDIS = "redis://localhost:6379/0"
# The long-running process types of the Procfile (`release` is a one-off step before a deploy).
PROCESSES = ["web", "worker", "embedder"]
# honcho SIGKILLs every process 5 s after its SIGTERM: a running job gets 2 s to finish and is
# then put back in its queue, so the workers have exited cleanly by then.
HONCHO_KILL_WAIT = 5
SHUTDOWN_GRACE = 2


# A `password=` query parameter, which redis-py accepts as well as the user part.
_PASSWORD_PARAMETER = re.compile(r"([?&;]password=)[^&;#]*", re.IGNORECASE)


def redacted(url: str) -> str:
    """`url` without its password, for printing, even when the URL is malformed.

    Not parsed as a URL: a password holding an unencoded `/`, `?`, `#` or `@` would leave part
    of itself outside what a parser calls the password. Everything between `://` and the last
    `@` is the user part; its password (after the first `:`) is hidden, as is a `password=`
    parameter.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "(not shown: not a redis://, rediss:// or unix:// URL)"
    userinfo, at, location = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{':***' if colon else ''}@{location}"
    return f"{scheme}://" + _PASSWORD_PARAMETER.sub(r"\1***", rest)


def url_problem(url: str) -> str | None:
    """Why redis-py cannot use `url`, in words that quote nothing of it; None when it can."""
    try:
        parse_url(url)
    except ValueError:
        # Not the error's own message: it can quote part of a password (as a "port").
        return (
            "redis-py cannot use it (it must start with redis://, rediss:// or unix://, and a "
            "password holding / ? # or @ must be percent-encoded, e.g. / as %2F)"
        )
    return None


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
    subprocess.run([sys.executable, "-m", "scripts.release"], cwd=ROOT, env=env, check=False)

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
