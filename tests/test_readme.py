"""The README's "Work over time" example, run as written against the Procfile's processes.

Each command whose line ends in a comment such as `# "status": "finished"` must print a JSON
object with those fields and values: the README says what a reader will see, and this is
where that is checked.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.integration

# A command on one line, then the fields its answer must have, as JSON members.
EXPECTING = re.compile(r'^(?P<command>curl .*?)\s+# (?P<fields>".*)$')
MARK = "@@@"


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def shell_block(text: str) -> str:
    return re.search(r"```sh\n(.*?)```", text, re.S).group(1)


def instrumented(script: str, base: str) -> tuple[str, list[dict]]:
    """The script aimed at `base`, each checked command's output between marks; the checks."""
    lines, expected = [], []
    for line in script.replace("localhost:5000", base).splitlines():
        found = EXPECTING.match(line)
        if found is None:
            lines.append(line)
            continue
        lines.append(f'echo "{MARK} {len(expected)}"; {found["command"]}; echo')
        expected.append(json.loads("{" + found["fields"] + "}"))
    return "set -euo pipefail\n" + "\n".join(lines) + "\n", expected


def test_the_examples_tell_what_each_command_prints():
    script, expected = instrumented(shell_block(section("Work over time")), "localhost:1")
    # Each feature's example is there, and checked.
    for route in ("/schedules", "depends_on", "/batches", "/pause"):
        assert route in script
    assert len(expected) >= 6


def test_the_work_over_time_example_runs_as_written(web, workers, real_redis):
    workers(count=2)
    script, expected = instrumented(shell_block(section("Work over time")), web.base.removeprefix("http://"))
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr + done.stdout
    outputs = done.stdout.split(MARK + " ")[1:]
    assert len(outputs) == len(expected), done.stdout
    for output, fields in zip(outputs, expected, strict=True):
        index, answer = output.split("\n", 1)
        body = json.loads(answer)
        shown = {name: body.get(name) for name in fields}
        assert shown == fields, f"command {index}: {answer}"
    # The queue the example paused runs again.
    assert not real_redis.exists("afterward:paused:low")
