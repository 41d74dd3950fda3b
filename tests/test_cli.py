"""The `afterward` command line against the real stack: day-2 commands, options, typing, errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests

from jobs.engine.job import Job
from jobs.index.store import DocumentStore
from jobs.settings import get_settings
from tests.support import ROOT, WebService
from tests.test_security import KEY_A

CLI = [sys.executable, "-m", "afterward_client.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AFTERWARD_")}
    # This checkout's client, not the copy installed into the virtualenv when it was made.
    environment["PYTHONPATH"] = str(ROOT / "client")
    environment.update(env or {})
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=environment, check=False
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once it is closed


@pytest.mark.parametrize("command", [["jobs"], ["submit", "log", "--message", "hi"], ["status", "0" * 32]])
def test_an_unreachable_server_is_one_line_and_exit_2_at_once(command):
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    answer = run(*command, "--url", url)
    assert answer.returncode == 2
    assert answer.stderr == f"cannot reach {url}: connection refused\n"
    assert answer.stdout == ""
    assert time.monotonic() - started < 5  # a refused connection is not retried


@pytest.fixture
def keyed_web(env, proc_dir) -> Iterator[WebService]:
    web = WebService(dict(env, API_KEYS=KEY_A, RATE_LIMIT="off"), proc_dir)
    yield web
    web.stop()


@pytest.mark.integration
def test_url_and_key_before_or_after_the_command_or_from_the_environment(keyed_web):
    web = keyed_web
    job = run("--url", web.base, "--api-key", KEY_A, "submit", "log", "--message", "mine")
    assert job.returncode == 0, job.stderr
    job_id = json.loads(job.stdout)["id"]
    nowhere = f"http://127.0.0.1:{closed_port()}"
    ways = {
        "before": run("--url", web.base, "--api-key", KEY_A, "jobs"),
        "after": run("jobs", "--url", web.base, "--api-key", KEY_A),
        "mixed": run("--api-key", KEY_A, "jobs", "--url", web.base),
        "environment": run("jobs", env={"AFTERWARD_URL": web.base, "AFTERWARD_API_KEY": KEY_A}),
        # Given after the command, an option wins over the environment.
        "over the environment": run(
            "jobs", "--url", web.base, env={"AFTERWARD_URL": nowhere, "AFTERWARD_API_KEY": KEY_A}
        ),
    }
    for way, answer in ways.items():
        assert answer.returncode == 0, f"{way}: {answer.stderr}"
        assert job_id in answer.stdout, way
    refused = run("jobs", "--url", web.base)
    assert refused.returncode == 1 and "401 unauthorized" in refused.stderr


@pytest.mark.integration
def test_submit_help_lists_the_types_fields_from_the_server(web):
    answer = run("submit", "log", "--help", "--url", web.base)
    assert answer.returncode == 0, answer.stderr
    for option in ("--message", "--level", "--queue", "--timeout", "--retries", "--delay", "--wait"):
        assert option in answer.stdout
    assert "{debug,info,warning,error}" in answer.stdout
    assert "Queue to run on" in answer.stdout  # the common fields' descriptions
    assert "Seconds to wait before the job may run" in answer.stdout
    sleep = run("submit", "sleep", "--help", "--url", web.base)
    assert "--seconds" in sleep.stdout and "--message" not in sleep.stdout


@pytest.mark.integration
def test_submit_types_values_by_the_schema(web, workers, real_redis):
    workers(count=1)
    text = run("submit", "log", "--message", "42", "--wait", "--url", web.base)
    assert text.returncode == 0, text.stderr
    view = json.loads(text.stdout)
    assert view["status"] == "finished"
    assert Job.fetch(view["id"], connection=real_redis).kwargs["message"] == "42"
    listed = run("submit", "log", "--message", "[1, 2]", "--retries", "2", "--url", web.base)
    job = Job.fetch(json.loads(listed.stdout)["id"], connection=real_redis)
    assert job.kwargs["message"] == "[1, 2]" and job.meta["retries"] == 2

    unknown = run("submit", "log", "--message", "x", "--colour", "red", "--url", web.base)
    assert unknown.returncode == 2
    assert "unknown field(s) --colour" in unknown.stderr and "--message" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    not_a_number = run("submit", "sleep", "--seconds", "soon", "--url", web.base)
    assert not_a_number.returncode == 2 and "--seconds" in not_a_number.stderr
    no_type = run("submit", "nope", "--url", web.base)
    assert no_type.returncode == 1 and "unknown_job_type" in no_type.stderr and "log" in no_type.stderr


@pytest.mark.integration
def test_only_job_types_are_submitted_retry_is_not_one(web, real_redis):
    # POST /jobs/retry (bulk retry) shares the /jobs/<type> shape but is no job type.
    known = requests.post(web.url("/jobs/nope"), json={}, timeout=30).json()["error"]["details"]
    assert "retry" not in known["known_types"] and "log" in known["known_types"]
    for command in (
        ["submit", "retry"],
        ["submit", "retry", "--help"],
        ["schedules", "create", "retry", "--every", "60"],
    ):
        answer = run(*command, "--url", web.base)
        assert answer.returncode == 1, answer.stderr
        assert "Traceback" not in answer.stderr and "KeyError" not in answer.stderr
        assert "unknown_job_type" in answer.stderr and "No job type 'retry'" in answer.stderr
        said = " ".join(answer.stderr.split())  # as one line, however the terminal folded it
        listed = said.split("the types are ", 1)[1].split(".", 1)[0]
        assert listed.split(", ") == sorted(known["known_types"])
    assert real_redis.keys("rq:job:*") == []  # nothing was retried or submitted


def test_the_client_library_submits_no_retry_job():
    # Refused before any request: POST /jobs/retry would run the key's failed jobs again.
    code = (
        "from afterward_client import Client\n"
        f"Client('http://127.0.0.1:{closed_port()}').submit('retry', {{}})"
    )
    answer = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "client")),
        check=False,
    )
    assert "ValueError: 'retry' is not a job type" in answer.stderr, answer.stderr


@pytest.mark.integration
def test_a_refused_key_names_the_option_and_the_variable(keyed_web):
    for given in ([], ["--api-key", "not-a-key"]):
        answer = run("jobs", "--url", keyed_web.base, *given)
        assert answer.returncode == 1 and "401 unauthorized" in answer.stderr
        assert "--api-key" in answer.stderr and "AFTERWARD_API_KEY" in answer.stderr, answer.stderr
    refused = run("jobs", "--url", keyed_web.base, env={"AFTERWARD_API_KEY": "not-a-key"})
    assert "was refused" in refused.stderr and "AFTERWARD_API_KEY" in refused.stderr


@pytest.mark.integration
def test_jobs_retry_and_retry_failed(web, workers):
    workers(count=1)
    logged = json.loads(run("submit", "log", "--message", "fine", "--url", web.base).stdout)["id"]
    flaky = [
        json.loads(run("submit", "flaky", "--failures", "1", "--url", web.base).stdout)["id"]
        for _ in range(3)
    ]
    web.wait_for_status(logged, {"finished"})
    for job_id in flaky:
        web.wait_for_status(job_id, {"failed"})

    failed = run("jobs", "--status", "failed", "--type", "flaky", "--url", web.base)
    assert failed.returncode == 0, failed.stderr
    rows = [line for line in failed.stdout.splitlines() if any(job_id in line for job_id in flaky)]
    assert len(rows) == 3 and all("flaky" in row and "failed" in row and "default" in row for row in rows)
    assert logged not in failed.stdout
    assert logged in run("jobs", "--type", "log", "--url", web.base).stdout
    assert flaky[0] not in run("jobs", "--type", "log", "--url", web.base).stdout

    one = run("retry", flaky[0], "--url", web.base)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["id"] == flaky[0]
    assert web.wait_for_status(flaky[0], {"finished"})["error"] is None

    many = run(
        "retry",
        "--failed",
        "--type",
        "flaky",
        "--queue",
        "default",
        "--since",
        "2000-01-01T00:00:00Z",
        "--url",
        web.base,
    )
    assert many.returncode == 0, many.stderr
    assert "retried 2 failed job(s)" in many.stderr
    assert sorted(many.stdout.split()) == sorted(flaky[1:])
    for job_id in flaky[1:]:
        web.wait_for_status(job_id, {"finished"})
    again = run("retry", "--failed", "--url", web.base)
    assert again.returncode == 0 and "retried 0 failed job(s)" in again.stderr

    conflict = run("retry", logged, "--url", web.base)
    assert conflict.returncode == 1 and "409" in conflict.stderr
    bad = run("retry", "--failed", "--since", "yesterday", "--url", web.base)
    assert bad.returncode == 1 and "validation_failed" in bad.stderr and "since" in bad.stderr
    neither = run("retry", "--url", web.base)
    assert neither.returncode == 2 and "--failed" in neither.stderr


@pytest.mark.integration
def test_queues_table(web, workers, real_redis):
    workers(count=1)
    job_id = json.loads(
        run("submit", "flaky", "--failures", "5", "--queue", "low", "--url", web.base).stdout
    )["id"]
    web.wait_for_status(job_id, {"failed"})
    answer = run("queues", "--url", web.base)
    assert answer.returncode == 0, answer.stderr
    assert "failed" in answer.stdout and "oldest queued" in answer.stdout
    rows = {line.split()[1]: line.split() for line in answer.stdout.splitlines() if line.startswith("│")}
    assert set(rows) >= {"high", "default", "low", "embed-high", "embed-default", "embed-low"}
    # low: worker, then queued started scheduled deferred failed finished.
    assert rows["low"][3:15:2] == ["worker", "0", "0", "0", "0", "1"]


@pytest.mark.integration
def test_queues_pause_and_resume(web, real_redis):
    paused = run("queues", "pause", "low", "--url", web.base)
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["paused"] is True
    table = run("queues", "--url", web.base).stdout
    assert "low (paused)" in table and "default (paused)" not in table
    resumed = run("queues", "resume", "low", "--url", web.base)
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["paused"] is False
    assert "(paused)" not in run("queues", "--url", web.base).stdout
    half = run("queues", "pause", "--url", web.base)
    assert half.returncode == 2 and "queues pause NAME" in half.stderr


@pytest.mark.integration
def test_document_and_delete_document(web, real_redis):
    settings = get_settings()
    vector = np.zeros((1, 384), dtype=np.float32)
    vector[0, 0] = 1.0
    DocumentStore(real_redis).upsert(
        [{"id": "cli-note", "text": "Written for the command line.", "metadata": {"lang": "en"}}],
        vector,
        revision=1,
        model=settings.embed_model_name,
    )
    shown = run("document", "cli-note", "--url", web.base)
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["text"] == "Written for the command line." and document["metadata"] == {"lang": "en"}
    deleted = run("delete-document", "cli-note", "--url", web.base)
    assert deleted.returncode == 0 and json.loads(deleted.stdout) == {"id": "cli-note", "deleted": True}
    gone = run("document", "cli-note", "--url", web.base)
    assert gone.returncode == 1 and "404 not_found" in gone.stderr


@pytest.mark.integration
def test_webhook_secret_prints_the_keys_signing_secret(keyed_web):
    from jobs.callbacks import key_secret
    from service.security import key_owner

    # The client in this tree, whichever copy is installed.
    answer = run(
        "webhook-secret",
        "--url",
        keyed_web.base,
        "--api-key",
        KEY_A,
        env={"PYTHONPATH": str(ROOT / "client")},
    )
    assert answer.returncode == 0, answer.stderr
    owner = key_owner(KEY_A)
    # The session's stack signs with CALLBACK_SECRET=test-callback-secret (tests/conftest.py).
    assert json.loads(answer.stdout) == {"owner": owner, "secret": key_secret("test-callback-secret", owner)}
