"""The `afterward` command line.

    afterward submit sleep --seconds 5 --wait        # a progress bar until it ends
    afterward submit log --message "hello" --level warning
    afterward submit log --help                       # the type's fields, from the server
    afterward status <id>
    afterward cancel <id>
    afterward jobs --status failed --type log         # a table of recent jobs
    afterward retry <id>                              # run a failed or stopped job again
    afterward retry --failed --type sleep --since 2026-11-29T08:00:00Z
    afterward queues                                  # jobs by state and workers, per queue
    afterward queues pause low                        # workers take no job off it (operators)
    afterward queues resume low
    afterward search "a kitten in the sun" -k 3
    afterward index notes/*.txt                       # one document per file
    afterward index --lines sentences.txt             # one document per line
    afterward document <id>
    afterward delete-document <id>
    afterward webhook-secret                          # what the key's webhooks are signed with
    afterward schedules create log --every 300 --message "every five minutes"
    afterward schedules create log --cron "0 9 * * 1-5" --timezone Europe/Berlin --message hi
    afterward schedules list                          # a table of the key's schedules
    afterward schedules show|pause|resume|delete <id>
    afterward batch jobs.jsonl --wait                 # one job a line, 1,000 per batch, a progress bar

The service is --url or AFTERWARD_URL (default http://127.0.0.1:5000), the key --api-key or
AFTERWARD_API_KEY; both options go before or after the command. A submit's fields are
`--name value` pairs, typed by the job type's schema (`--message 42` is the text "42").
Exit codes: 0 done, 1 the service refused the request, 2 a usage error or no service reached,
3 (`batch --wait`) a job of the batch did not finish.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from afterward_client.client import AfterwardError, Client, Unreachable

out = Console()
err = Console(stderr=True)
# Piped output keeps whole rows (job ids included) instead of folding them to 80 columns.
if not out.is_terminal:
    out.width = max(out.width, 200)

DEFAULT_URL = "http://127.0.0.1:5000"
STATUSES = (
    "queued",
    "rate_limited",
    "started",
    "finished",
    "failed",
    "deferred",
    "scheduled",
    "canceled",
    "stopped",
)
# RQ queue names, as the job view and `afterward queues` show them.
QUEUES = ("high", "default", "low", "embed-high", "embed-default", "embed-low")
# Exit codes.
OK, REFUSED, USAGE, JOBS_FAILED = 0, 1, 2, 3
# Most jobs the service takes in one batch: a longer file is sent as several batches.
BATCH_SIZE = 1000


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not (args.command == "submit" or getattr(args, "takes_fields", False)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "submit" and args.type is None:
        if args.help:
            args.parser.print_help()
            return OK
        args.parser.error("the job type is required: afterward submit TYPE --field value ...")
    if args.command == "retry" and (args.id is None) == (args.status is None):
        args.parser.error("give a job id, or --failed (or --stopped) to retry many")
    if args.command == "queues" and (args.action is None) != (args.name is None):
        args.parser.error("give both: queues pause NAME, or queues resume NAME")
    client = Client(args.url, api_key=args.api_key)
    try:
        return args.run(client, args, extra)
    except AfterwardError as error:
        err.print(
            f"[red]error[/red] {error.status} {error.code}: {error.message}", markup=True, highlight=False
        )
        if error.details:
            err.print(json.dumps(error.details, indent=2, ensure_ascii=False), markup=False, highlight=False)
        if error.status == 401:
            err.print(
                "the API key given (--api-key or AFTERWARD_API_KEY) was refused"
                if args.api_key
                else "no API key was given: pass --api-key KEY, or set AFTERWARD_API_KEY=KEY",
                highlight=False,
            )
        return REFUSED
    except Unreachable as error:
        sys.stderr.write(f"{error}\n")
        return USAGE
    except requests.RequestException as error:  # a connection that kept breaking after retries
        sys.stderr.write(f"cannot reach {args.url.rstrip('/')}: {type(error).__name__}\n")
        return USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afterward",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _service_options(
        parser, os.environ.get("AFTERWARD_URL", DEFAULT_URL), os.environ.get("AFTERWARD_API_KEY")
    )
    # The same options after the command: set only when given there, so that given before it, or
    # by the environment, they are not overwritten by a default.
    after = argparse.ArgumentParser(add_help=False)
    _service_options(after, argparse.SUPPRESS, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[..., int], help: str, **kwargs: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help, description=help, parents=[after], allow_abbrev=False, **kwargs
        )
        sub.set_defaults(run=run, parser=sub)
        return sub

    submit = command(
        "submit",
        run_submit,
        "submit a job: submit TYPE --field value ... [--wait]; `submit TYPE --help` lists TYPE's fields",
        add_help=False,
    )
    submit.add_argument("type", nargs="?", help="the job type, e.g. log, sleep, embed")
    submit.add_argument(
        "--wait", action="store_true", help="follow the job, with a progress bar, until it ends"
    )
    submit.add_argument("-h", "--help", action="store_true", help="show the job type's fields and exit")

    status = command("status", run_status, "show a job")
    status.add_argument("id", help="the job's id")
    status.add_argument("--wait", type=float, default=0, help="wait up to N seconds (0-60) for it to end")

    cancel = command("cancel", run_cancel, "cancel a job, or stop it if it runs")
    cancel.add_argument("id", help="the job's id")

    jobs = command("jobs", run_jobs, "list recent jobs, newest first, as a table")
    jobs.add_argument("--status", choices=STATUSES, help="only jobs in this status")
    jobs.add_argument("--type", dest="job_type", metavar="TYPE", help="only jobs of this type")
    jobs.add_argument("--queue", choices=QUEUES, help="only jobs on this queue")
    jobs.add_argument("--limit", type=int, default=50, help="how many jobs, 1-200 (default 50)")

    retry = command("retry", run_retry, "run a failed or stopped job again, or many with --failed")
    retry.add_argument("id", nargs="?", help="the job to retry (or use --failed)")
    which = retry.add_mutually_exclusive_group()
    which.add_argument(
        "--failed",
        dest="status",
        action="store_const",
        const="failed",
        help="retry every failed job of the key",
    )
    which.add_argument(
        "--stopped",
        dest="status",
        action="store_const",
        const="stopped",
        help="retry every stopped job instead",
    )
    retry.add_argument(
        "--type", dest="job_type", metavar="TYPE", help="with --failed: only jobs of this type"
    )
    retry.add_argument("--queue", choices=QUEUES, help="with --failed: only jobs of this queue")
    retry.add_argument(
        "--since", metavar="TIME", help="with --failed: only jobs that ended at or after this ISO 8601 time"
    )
    retry.add_argument(
        "--limit", type=int, help="with --failed: at most this many (the server's default: 100)"
    )

    queues = command(
        "queues",
        run_queues,
        "show every queue: jobs by state, the oldest queued job's age, workers; or pause or resume one",
    )
    queues.add_argument(
        "action", nargs="?", choices=("pause", "resume"), help="pause or resume a queue (operators' keys)"
    )
    queues.add_argument(
        "name", nargs="?", choices=QUEUES, metavar="NAME", help=f"the queue: {', '.join(QUEUES)}"
    )

    search = command("search", run_search, "find documents by meaning")
    search.add_argument("query", help="what to look for, in plain words")
    search.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    search.add_argument(
        "--filter", type=json.loads, default=None, help='metadata to match, as JSON: {"lang": "en"}'
    )

    index = command("index", run_index, "embed files: one document per file, or per line with --lines")
    index.add_argument("files", nargs="+", type=Path, help="text files (UTF-8)")
    index.add_argument("--lines", action="store_true", help="one document per non-empty line")
    index.add_argument("--wait", action="store_true", help="follow the embed job until it ends")

    document = command("document", run_document, "show an indexed document")
    document.add_argument("id", help="the document's id")

    delete = command("delete-document", run_delete_document, "remove a document from the index")
    delete.add_argument("id", help="the document's id")

    command(
        "webhook-secret", run_webhook_secret, "show the secret the key's completion webhooks are signed with"
    )
    _schedule_commands(
        command("schedules", run_schedules, "recurring jobs: create, list, show, pause, resume, delete"),
        after,
    )

    batch = command(
        "batch",
        run_batch,
        f'submit the jobs of a JSON Lines file ({{"type": ..., fields...}} a line), {BATCH_SIZE:,} '
        "per batch, each batch all or none",
    )
    batch.add_argument("file", type=Path, help="a .jsonl file: one job a line; blank lines are skipped")
    batch.add_argument(
        "--wait", action="store_true", help="follow the batches, with a progress bar, until every job ends"
    )
    batch.add_argument("--callback-url", help="receives a signed batch.ended delivery as each batch ends")
    return parser


def _schedule_commands(schedules: argparse.ArgumentParser, after: argparse.ArgumentParser) -> None:
    actions = schedules.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help, description=help, parents=[after], allow_abbrev=False)
        sub.set_defaults(parser=sub)
        return sub

    create = action(
        "create",
        "submit a job at every tick: create TYPE (--cron EXPR | --every N) [--timezone TZ] [--paused] "
        "--field value ...; the fields are those of `submit TYPE` (`submit TYPE --help` lists them)",
    )
    create.set_defaults(takes_fields=True)
    create.add_argument("type", help="the job type, e.g. log, sleep, embed")
    when = create.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help='a five-field cron expression, e.g. "*/5 * * * *"')
    when.add_argument("--every", type=int, metavar="N", help="every N seconds (1 to a year)")
    create.add_argument("--timezone", metavar="TZ", help="IANA timezone of --cron (default UTC)")
    create.add_argument("--paused", action="store_true", help="create it paused")
    create.add_argument("--name", help="a label")
    action("list", "list the key's schedules as a table")
    for name, help in (
        ("show", "show a schedule"),
        ("pause", "pause a schedule from its next tick on"),
        ("resume", "resume a schedule, from its first tick after now"),
        ("delete", "delete a schedule (the jobs it made stay)"),
    ):
        action(name, help).add_argument("id", help="the schedule's id")


def _service_options(parser: argparse.ArgumentParser, url: Any, api_key: Any) -> None:
    parser.add_argument("--url", default=url, help=f"the service (env AFTERWARD_URL; default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=api_key, help="the API key to send (env AFTERWARD_API_KEY)")


# ---------------------------------------------------------------- commands


def run_submit(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    schema = request_schema(client, args.type)
    fields = field_parser(args.type, schema)
    if args.help:
        fields.print_help()
        return OK
    values, unknown = fields.parse_known_args(extra)
    if unknown:
        known = ", ".join(f"--{name}" for name in schema.get("properties", {}))
        fields.error(f"unknown field(s) {' '.join(unknown)}; a {args.type} job's fields are {known}")
    body = {name: value for name, value in vars(values).items() if value is not None}
    view = client.submit(args.type, body)
    err.print(f"submitted {args.type} job {view['id']}", highlight=False)
    print_json(follow(client, view) if args.wait else view)
    return OK


def run_status(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    print_json(client.status(args.id, wait=args.wait))
    return OK


def run_cancel(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    print_json(client.cancel(args.id))
    return OK


def run_jobs(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    found = client.jobs(status=args.status, queue=args.queue, limit=args.limit, job_type=args.job_type)
    table = Table("id", "type", "status", "queue", "created", "ended")
    table.columns[0].no_wrap = True
    for job in found:
        table.add_row(
            job["id"],
            job["type"] or "",
            job["status"],
            job["queue"],
            _time(job["created_at"]),
            _time(job["ended_at"]),
        )
    out.print(table)
    return OK


def run_retry(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    if args.id is not None:
        if args.job_type or args.queue or args.since or args.limit:
            args.parser.error("--type, --queue, --since and --limit go with --failed, not with a job id")
        print_json(client.retry(args.id))
        return OK
    answer = client.retry_failed(
        status=args.status, job_type=args.job_type, queue=args.queue, since=args.since, limit=args.limit
    )
    err.print(f"retried {answer['retried']} {args.status} job(s)", highlight=False)
    for job_id in answer["job_ids"]:
        out.print(job_id, highlight=False)
    if answer["more"]:
        err.print("more jobs match: run the command again to retry them", highlight=False)
    return OK


def run_queues(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    if args.action is not None:
        change = client.pause_queue if args.action == "pause" else client.resume_queue
        print_json(change(args.name))
        return OK
    states = ("queued", "started", "scheduled", "deferred", "failed", "stopped", "finished")
    table = Table("queue", "process", *states, "oldest queued", "workers")
    for queue in client.queues():
        oldest = queue["oldest_queued_seconds"]
        busy = sum(1 for worker in queue["workers"] if worker["state"] == "busy")
        table.add_row(
            f"{queue['name']} (paused)" if queue.get("paused") else queue["name"],
            queue["process_type"],
            *(str(queue["counts"][state]) for state in states),
            "" if oldest is None else f"{oldest:.1f} s",
            f"{len(queue['workers'])} ({busy} busy)",
        )
    out.print(table)
    return OK


def run_search(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    show_results(client.search(args.query, k=args.k, where=args.filter))
    return OK


def run_index(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    documents = read_documents(args.files, args.lines)
    view = client.index(documents)
    err.print(f"indexing {len(documents)} document(s): job {view['id']}", highlight=False)
    print_json(follow(client, view) if args.wait else view)
    return OK


def run_document(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    print_json(client.document(args.id))
    return OK


def run_delete_document(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    print_json(client.delete_document(args.id))
    return OK


def run_webhook_secret(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    print_json(client.webhook_secret())
    return OK


def run_schedules(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    if args.action == "create":
        schema = request_schema(client, args.type)
        fields = field_parser(args.type, schema)
        values, unknown = fields.parse_known_args(extra)
        if unknown:
            known = ", ".join(f"--{name}" for name in schema.get("properties", {}))
            args.parser.error(f"unknown field(s) {' '.join(unknown)}; a {args.type} job's fields are {known}")
        body = {name: value for name, value in vars(values).items() if value is not None}
        schedule = client.create_schedule(
            args.type,
            body,
            cron=args.cron,
            every=args.every,
            timezone=args.timezone,
            paused=args.paused,
            name=args.name,
        )
        err.print(f"created schedule {schedule['id']}", highlight=False)
        print_json(schedule)
    elif args.action == "list":
        table = Table("id", "name", "type", "when", "paused", "next run", "runs", "last job")
        table.columns[0].no_wrap = True
        for schedule in client.schedules():
            when = (
                f"every {schedule['every']} s"
                if schedule["every"]
                else f"{schedule['cron']} ({schedule['timezone']})"
            )
            table.add_row(
                schedule["id"],
                schedule["name"] or "",
                schedule["type"],
                when,
                "yes" if schedule["paused"] else "",
                _time(schedule["next_run_at"]),
                str(schedule["runs"]),
                schedule["last_job_id"] or "",
            )
        out.print(table)
    else:
        run = {
            "show": client.schedule,
            "pause": client.pause_schedule,
            "resume": client.resume_schedule,
            "delete": client.delete_schedule,
        }[args.action]
        print_json(run(args.id))
    return OK


def run_batch(client: Client, args: argparse.Namespace, extra: list[str]) -> int:
    try:
        jobs = read_jobs(args.file)
    except ValueError as error:
        args.parser.error(str(error))
    accepted = []
    for start in range(0, len(jobs), BATCH_SIZE):
        chunk = jobs[start : start + BATCH_SIZE]
        answer = client.submit_batch(chunk, callback_url=args.callback_url)
        err.print(f"submitted batch {answer['id']}: {answer['total']} job(s)", highlight=False)
        accepted.append(answer)
    if not args.wait:
        for answer in accepted:
            print_json(answer)
        return OK
    views = follow_batches(client, accepted)
    for view in views:
        print_json({name: value for name, value in view.items() if name != "job_ids"})
    ended_badly = sum(
        view["counts"][status] for view in views for status in ("failed", "stopped", "canceled")
    )
    if ended_badly:
        err.print(f"[red]{ended_badly} job(s) did not finish[/red]", markup=True, highlight=False)
        return JOBS_FAILED
    return OK


def read_jobs(path: Path) -> list[dict[str, Any]]:
    """The jobs of a JSON Lines file: one object with a "type" a line (ValueError naming the line)."""
    jobs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if not isinstance(job, dict) or not isinstance(job.get("type"), str):
            raise ValueError(
                f'{path}:{number}: a job is an object with a "type", e.g. {{"type": "log", ...}}'
            )
        jobs.append(job)
    if not jobs:
        raise ValueError(f"{path}: no jobs")
    return jobs


# ---------------------------------------------------------------- a job type's fields


def request_schema(client: Client, job_type: str) -> dict[str, Any]:
    """The JSON schema of `POST /jobs/<job_type>`'s body, from the service's OpenAPI document."""
    spec = client.openapi()
    prefix = "/jobs/"
    known = sorted(path[len(prefix) :] for path, item in spec["paths"].items() if _is_submit(path, item))
    if job_type not in known:
        raise AfterwardError(
            404, "unknown_job_type", f"No job type {job_type!r}; the types are {', '.join(known)}."
        )
    body = spec["paths"][prefix + job_type]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return _resolve(body, spec)


def field_parser(job_type: str, schema: dict[str, Any]) -> argparse.ArgumentParser:
    """A parser for a job type's `--field value` pairs, each converted to the schema's type."""
    parser = argparse.ArgumentParser(
        prog=f"afterward submit {job_type}",
        description=f"Submit a {job_type} job. Its fields, and the options every job has:",
        epilog="--wait follows the job, with a progress bar, until it ends; --url and --api-key "
        "name the service as for every command.",
        add_help=False,
        allow_abbrev=False,
    )
    required = set(schema.get("required", []))
    for name, field in schema.get("properties", {}).items():
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        kinds = _kinds(field)
        if _is_string_list(field):  # e.g. --depends-on ID, repeated or a comma list
            parser.add_argument(
                *names, dest=name, action="extend", type=_comma_list, metavar="ID[,ID...]",
                help=_field_help(field, name in required),
            )  # fmt: skip
            continue
        parser.add_argument(
            *names,
            dest=name,
            type=_converter(kinds),
            metavar=_metavar(field, kinds),
            help=_field_help(field, name in required),
        )
    return parser


def _is_submit(path: str, item: dict[str, Any]) -> bool:
    """A job type's route: `POST /jobs/<type>` answers 202 with the job it created. Other
    `POST /jobs/...` routes (`/jobs/retry`, which queues many jobs again) answer otherwise."""
    accepted = item.get("post", {}).get("responses", {}).get("202", {})
    schema = accepted.get("content", {}).get("application/json", {}).get("schema", {})
    return (
        path.startswith("/jobs/")
        and path.count("/") == 2
        and "{" not in path
        and "JobView" in (schema.get("$ref", "").rsplit("/", 1)[-1], schema.get("title"))
    )


def _resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    name = ref.rsplit("/", 1)[-1]
    return _resolve(spec["components"]["schemas"][name], spec)


def _kinds(field: dict[str, Any]) -> set[str]:
    """The JSON types a field takes (null left out)."""
    if "anyOf" in field or "oneOf" in field:
        return set().union(*(_kinds(option) for option in field.get("anyOf", field.get("oneOf", []))))
    if "type" in field:
        kinds = field["type"] if isinstance(field["type"], list) else [field["type"]]
        return set(kinds) - {"null"}
    if "enum" in field:
        return {_json_type(value) for value in field["enum"]} - {"null"}
    if "const" in field:
        return {_json_type(field["const"])}
    return {"object"}  # a $ref: a model


def _is_string_list(field: dict[str, Any]) -> bool:
    options = field.get("anyOf", [field])
    return any(
        each.get("type") == "array" and (each.get("items") or {}).get("type") == "string" for each in options
    )


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "object"


def _converter(kinds: set[str]) -> Callable[[str], Any]:
    if kinds == {"string"}:
        return str
    if kinds == {"integer"}:
        return integer
    if kinds <= {"integer", "number"} and kinds:
        return number
    if kinds == {"boolean"}:
        return boolean
    if "string" in kinds:
        return json_or_text
    return json_value


def integer(text: str) -> int:
    return int(text)


def number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise ValueError(text)


def json_value(text: str) -> Any:
    return json.loads(text)


def json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _metavar(field: dict[str, Any], kinds: set[str]) -> str:
    if "enum" in field:
        return "{" + ",".join(str(value) for value in field["enum"]) + "}"
    if kinds <= {"array", "object"}:
        return "JSON"
    return "|".join(sorted(kinds)).upper() or "VALUE"


def _field_help(field: dict[str, Any], required: bool) -> str:
    parts = [field.get("description") or field.get("title", "")]
    bounds = [
        f"{label} {field[key]}"
        for key, label in (
            ("minimum", "min"),
            ("exclusiveMinimum", "above"),
            ("maximum", "max"),
            ("minLength", "min length"),
            ("maxLength", "max length"),
        )
        if key in field
    ]
    if bounds:
        parts.append(f"({', '.join(bounds)})")
    if required:
        parts.append("(required)")
    elif field.get("default") is not None:
        parts.append(f"(default {json.dumps(field['default'])})")
    # argparse formats help with %: a literal percent sign must be doubled.
    return " ".join(part for part in parts if part).replace("%", "%%")


# ---------------------------------------------------------------- output


def follow(client: Client, view: dict[str, Any]) -> dict[str, Any]:
    """Long-poll the job to its end, drawing its progress."""
    with Progress(
        TextColumn("[bold]{task.fields[status]}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("job", total=100, status=view["status"], message="")

        def update(current: dict[str, Any]) -> None:
            progress = current.get("progress") or {}
            done = 100 if current["status"] == "finished" else progress.get("percent", 0)
            bar.update(task, completed=done, status=current["status"], message=progress.get("message", ""))

        return client.wait(view, on_update=update)


def follow_batches(client: Client, accepted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long-poll each batch until it is done, drawing the jobs ended of all of them."""
    total = sum(answer["total"] for answer in accepted)
    ended = {answer["id"]: 0 for answer in accepted}
    with Progress(
        TextColumn("[bold]{task.fields[status]}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("batch", total=total, status="running", message="")
        failed: dict[str, int] = {}

        def update(view: dict[str, Any]) -> None:
            counts = view["counts"]
            ended[view["id"]] = sum(counts[status] for status in _ENDED)
            failed[view["id"]] = sum(counts[status] for status in ("failed", "stopped", "canceled"))
            done = sum(ended.values())
            message = f"{done} of {total} ended" + (
                f", {sum(failed.values())} failed" if any(failed.values()) else ""
            )
            bar.update(task, completed=done, message=message)

        views = [client.wait_batch(answer, on_update=update, poll=30) for answer in accepted]
        bar.update(task, status="done")
    return views


# What a batch view counts as ended.
_ENDED = ("finished", "failed", "stopped", "canceled", "expired")


def read_documents(files: list[Path], per_line: bool) -> list[dict[str, Any]]:
    documents = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        if per_line:
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    documents.append(
                        {
                            "id": _doc_id(f"{path.name}:{number}"),
                            "text": line,
                            "metadata": {"file": path.name},
                        }
                    )
        elif text.strip():
            documents.append({"id": _doc_id(path.name), "text": text, "metadata": {"file": path.name}})
    return documents


def _doc_id(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._:-" else "-" for c in name)
    return cleaned[:256] or "document"


def _time(value: str | None) -> str:
    """`2026-11-29T08:00:01.123Z` -> `2026-11-29 08:00:01` (UTC)."""
    return value[:19].replace("T", " ") if value else ""


def show_results(results: list[dict[str, Any]]) -> None:
    table = Table("score", "id", "text")
    for result in results:
        table.add_row(f"{result['score']:.3f}", result["id"], result["text"][:120])
    out.print(table)


def print_json(value: dict[str, Any]) -> None:
    value = {k: v for k, v in value.items() if not k.startswith("_")}
    out.print_json(json.dumps(value, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
