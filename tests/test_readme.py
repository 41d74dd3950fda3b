"""The README's walk-through and every example in docs/, run as written against the Procfile's processes.

Each fenced block of shell (`sh`) or Python in README.md and docs/*.md runs, in the order of
its document and in one shell per document (as a reader runs them, in one terminal), against
a web process, two workers and an embedder on a Redis of the test's own; the only change is
the port, `localhost:5000` becoming the test's. A block that cannot run here (it starts the
stack itself, or needs Sentinel or a deploy platform) says so on the line before it:

    <!-- not run: needs a Sentinel topology -->

Every shell command in a block that runs says what it prints, in a comment at its end:
`"field": value, ...` are members of its JSON answer (`...` allows more members or items;
`"…"` is any value), and each `` `text` `` is text the output contains. So the outputs the
docs show are checked, and a command whose output no reader is told is an error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, start_workers

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not run: (?P<why>\S[^>]*?) -->\s*$")
RUNNABLE = {"sh": "shell", "python": "python"}
# Lines that print nothing a reader is told of: assignments, exports, function definitions,
# commands whose output goes to a file.
QUIET = re.compile(r"^(export |[A-Za-z_][A-Za-z0-9_]*=|[a-z_]+\(\) \{)|>\s*[\w.-]+\s*$")
BASE = "localhost:5000"


@dataclass
class Block:
    document: Path
    line: int
    lang: str
    body: str
    not_run: str | None

    @property
    def where(self) -> str:
        name = self.document.relative_to(ROOT) if self.document.is_relative_to(ROOT) else self.document
        return f"{name}:{self.line}"


@dataclass
class Check:
    """What one command prints: JSON members, and fragments of text."""

    command: str
    where: str
    fields: dict[str, Any] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)


def blocks(document: Path) -> list[Block]:
    text = document.read_text()
    found = []
    for fence in FENCE.finditer(text):
        before = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marked = NOT_RUN.search(before)
        found.append(
            Block(
                document,
                text.count("\n", 0, fence.start()) + 1,
                fence["lang"].strip(),
                fence["body"],
                marked["why"] if marked else None,
            )
        )
    return found


def runnable(document: Path) -> list[Block]:
    return [block for block in blocks(document) if block.lang in RUNNABLE and block.not_run is None]


def scan(line: str) -> tuple[str | None, int | None]:
    """The quote still open at the end of `line`, and where a comment starts in it (outside quotes)."""
    quote, escaped = None, False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote is not None:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return None, index
    return quote, None


def commands(body: str) -> list[tuple[str, str | None]]:
    """The block's commands, continuation lines and quoted line breaks included, and their comments."""
    found: list[tuple[str, str | None]] = []
    pending = ""
    for line in body.splitlines():
        text = pending + line
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        quote, comment = scan(text)
        if quote is not None:
            pending = text + "\n"
            continue
        pending = ""
        if comment is None:
            found.append((text, None))
        else:
            found.append((text[:comment].rstrip(), text[comment + 1 :].strip()))
    assert not pending, f"a command left unfinished: {pending}"
    return found


def parse_check(text: str) -> tuple[dict[str, Any], list[str]]:
    """`"a": 1, `text`` into ({"a": 1}, ["text"]); ValueError for anything else."""
    texts = re.findall(r"`([^`]+)`", text)
    rest = re.sub(r"`[^`]+`", "", text).strip(" ,")
    if not rest:
        if not texts:
            raise ValueError("an empty check")
        return {}, texts
    members = "{" + rest + "}" if rest.startswith('"') else rest
    members = re.sub(r"\{\s*(\.\.\.|…)\s*\}", "{}", members)
    members = re.sub(r",\s*(\.\.\.|…)\s*\}", "}", members)
    members = re.sub(r"\[\s*(\.\.\.|…)\s*\]", '["__more__"]', members)
    members = re.sub(r",\s*(\.\.\.|…)\s*\]", ', "__more__"]', members)
    try:
        fields = json.loads(members)
    except ValueError:
        raise ValueError(f"not JSON members or `text`: {text}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"not JSON members: {text}")
    return fields, texts


def matches(expected: Any, actual: Any) -> bool:
    """Whether `actual` shows what `expected` says: more members are allowed, `"…"` is any value."""
    if expected == "…":
        return True
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            name in actual and matches(value, actual[name]) for name, value in expected.items()
        )
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return False
        if expected and expected[-1] == "__more__":
            expected = expected[:-1]
            actual = actual[: len(expected)]
        return len(expected) == len(actual) and all(map(matches, expected, actual))
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected is actual
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return expected == actual
    return type(expected) is type(actual) and expected == actual


def instrumented(document: Path, base: str, out: Path) -> tuple[str, list[Check]]:
    """The document's runnable blocks as one bash script aimed at `base`; what each command must print."""
    # -x: a failure's output shows each command as it ran.
    lines = ["set -xeuo pipefail", f"export AFTERWARD_URL=http://{base}"]
    checks: list[Check] = []
    for block in runnable(document):
        body = block.body.replace(BASE, base).replace("127.0.0.1:5000", base)
        if block.lang == "python":
            lines += [".venv/bin/python - <<'PYTHON'", body.rstrip("\n"), "PYTHON"]
            continue
        for command, comment in commands(body):
            if not command.strip() or QUIET.search(command.lstrip()):
                lines.append(command)  # a remark, or an assignment's: not an output
                continue
            if comment is None:
                raise AssertionError(
                    f"{block.where}: say what `{command.strip()}` prints, in a comment after it"
                )
            try:
                fields, texts = parse_check(comment)
            except ValueError as error:
                raise AssertionError(f"{block.where}: {error}") from None
            lines.append(f'{{ {command}\n}} > "{out}/{len(checks)}"')
            checks.append(Check(command.strip(), block.where, fields, texts))
    return "\n".join(lines) + "\n", checks


def verify(check: Check, output: str) -> None:
    for text in check.texts:
        assert text in output, f"{check.where}: `{check.command}` printed no `{text}`:\n{output}"
    if check.fields:
        body = re.split(r"\r?\n\r?\n", output, maxsplit=1)[1] if output.startswith("HTTP/") else output
        answer = json.loads(body)
        shown = {name: answer.get(name) for name in check.fields}
        assert matches(check.fields, answer), f"{check.where}: `{check.command}` printed {shown}"


# ---------------------------------------------------------------- every block: run, or why not


def test_every_fence_names_its_language_and_every_unrun_block_says_why():
    for document in DOCUMENTS:
        for block in blocks(document):
            assert block.lang, f"{block.where}: name the block's language (sh, python, json, text...)"
            assert block.lang not in {"bash", "shell", "console", "py"}, f"{block.where}: sh or python"
    marked = [block.where for document in DOCUMENTS for block in blocks(document) if block.not_run]
    assert marked, "the not-run marker is recognised"


def test_every_command_that_runs_says_what_it_prints(tmp_path):
    total = 0
    for document in DOCUMENTS:
        _, checks = instrumented(document, "localhost:1", tmp_path)
        total += len(checks)
    # The walk-through's five steps and the work over time are there, and checked.
    readme = instrumented(ROOT / "README.md", "localhost:1", tmp_path)[1]
    shown = " ".join(check.command for check in readme)
    for route in ("/jobs/log", "?wait=", "/search", "afterward submit", "/rq/", "/schedules", "/batches"):
        assert route in shown
    assert len(readme) >= 20 and total > len(readme)


def test_a_command_without_its_output_is_refused(tmp_path):
    document = tmp_path / "example.md"
    document.write_text("```sh\ncurl -s localhost:5000/healthz\n```\n")
    with pytest.raises(AssertionError, match="say what"):
        instrumented(document, "localhost:1", tmp_path)
    document.write_text("```sh\ncurl -s localhost:5000/healthz   # answers fine\n```\n")
    with pytest.raises(AssertionError, match="not JSON members"):
        instrumented(document, "localhost:1", tmp_path)
    document.write_text("<!-- not run: an example -->\n```sh\ncurl -s localhost:5000/healthz\n```\n")
    assert instrumented(document, "localhost:1", tmp_path)[1] == []


def test_the_checks_read_as_the_docs_write_them():
    fields, texts = parse_check('`202`, "status": "queued", "result": {"indexed": ["cat"], ...}')
    assert texts == ["202"]
    assert matches(fields, {"status": "queued", "result": {"indexed": ["cat"], "refused": []}, "id": "x"})
    assert not matches(fields, {"status": "started", "result": {"indexed": ["cat"]}})
    results, _ = parse_check('"results": [{"id": "cat", ...}, ...]')
    assert matches(results, {"results": [{"id": "cat", "score": 0.6}, {"id": "bread"}]})
    assert not matches(results, {"results": [{"id": "bread"}, {"id": "cat"}]})
    assert not matches(results, {"results": []})
    exact, _ = parse_check('"results": [{"id": "stocks", ...}], "secret": "…"')
    assert matches(exact, {"results": [{"id": "stocks"}], "secret": "s3cr3t"})
    assert not matches(exact, {"results": [{"id": "stocks"}, {"id": "cat"}], "secret": "s"})
    assert not matches(exact, {"results": [{"id": "stocks"}]})
    number, _ = parse_check('"slept": 3.0, "paused": false')
    assert matches(number, {"slept": 3, "paused": False})
    assert not matches(number, {"slept": 3.0, "paused": 0})


# ---------------------------------------------------------------- the examples, run


@pytest.mark.integration
@pytest.mark.parametrize(
    "document",
    [document for document in DOCUMENTS if runnable(document)],
    ids=lambda document: document.name,
)
def test_the_examples_run_as_written(document, web, workers, env, proc_dir, real_redis, tmp_path):
    workers(count=2)
    script, checks = instrumented(document, web.base.removeprefix("http://"), tmp_path)
    embedder = start_workers(env, proc_dir, count=1, kind="embedder")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".venv").symlink_to(ROOT / ".venv")
    try:
        done = subprocess.run(
            ["bash", "-c", script],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=home,
            env=dict(os.environ, HOME=str(home)),
        )
    except subprocess.TimeoutExpired as error:
        shown = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr
        raise AssertionError(f"{document.name}: still running after 240 s\n{shown}") from None
    finally:
        embedder.kill()
    assert done.returncode == 0, f"{document.name}: exit {done.returncode}\n{done.stderr}\n{done.stdout}"
    for index, check in enumerate(checks):
        verify(check, (tmp_path / str(index)).read_text())
    # What the examples paused runs again.
    assert not real_redis.keys("afterward:paused:*")
