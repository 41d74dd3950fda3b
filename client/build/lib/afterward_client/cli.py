"""The `afterward` command line.

    afterward submit sleep --seconds 5 --wait        # a progress bar until it ends
    afterward submit log --message "hello" --level warning
    afterward status <id>
    afterward cancel <id>
    afterward search "a kitten in the sun" -k 3
    afterward index notes/*.txt                       # one document per file
    afterward index --lines sentences.txt             # one document per line

The service is AFTERWARD_URL (default http://127.0.0.1:5000), the key AFTERWARD_API_KEY.
A submit's fields are `--name value` pairs; a value that reads as JSON (3, true, [1]) is
sent as such, any other as text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from afterward_client.client import AfterwardError, Client

out = Console()
err = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="afterward", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=os.environ.get("AFTERWARD_URL", "http://127.0.0.1:5000"))
    parser.add_argument("--api-key", default=os.environ.get("AFTERWARD_API_KEY"))
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="submit a job: submit TYPE --field value ... [--wait]")
    submit.add_argument("type")
    submit.add_argument(
        "--wait", action="store_true", help="follow the job, with a progress bar, until it ends"
    )

    status = commands.add_parser("status", help="show a job")
    status.add_argument("id")
    status.add_argument("--wait", type=float, default=0, help="wait up to N seconds for it to end")

    cancel = commands.add_parser("cancel", help="cancel a job, or stop it if it runs")
    cancel.add_argument("id")

    search = commands.add_parser("search", help="find documents by meaning")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5)
    search.add_argument(
        "--filter", type=json.loads, default=None, help='metadata to match, as JSON: {"lang": "en"}'
    )

    index = commands.add_parser("index", help="embed files: one document per file, or per line with --lines")
    index.add_argument("files", nargs="+", type=Path)
    index.add_argument("--lines", action="store_true", help="one document per non-empty line")
    index.add_argument("--wait", action="store_true")

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "submit":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    client = Client(args.url, api_key=args.api_key)
    try:
        if args.command == "submit":
            view = client.submit(args.type, parse_fields(extra))
            err.print(f"submitted {args.type} job {view['id']}")
            print_json(follow(client, view) if args.wait else view)
        elif args.command == "status":
            print_json(client.status(args.id, wait=args.wait))
        elif args.command == "cancel":
            print_json(client.cancel(args.id))
        elif args.command == "search":
            show_results(client.search(args.query, k=args.k, where=args.filter))
        elif args.command == "index":
            documents = read_documents(args.files, args.lines)
            view = client.index(documents)
            err.print(f"indexing {len(documents)} document(s): job {view['id']}")
            print_json(follow(client, view) if args.wait else view)
    except AfterwardError as error:
        err.print(f"[red]error[/red] {error.status} {error.code}: {error.message}")
        if error.details:
            err.print(json.dumps(error.details, indent=2, ensure_ascii=False))
        return 1
    return 0


def parse_fields(pairs: list[str]) -> dict[str, Any]:
    """`--seconds 3 --message hi` -> {"seconds": 3, "message": "hi"}."""
    fields: dict[str, Any] = {}
    name = None
    for token in pairs:
        if token.startswith("--") and name is None:
            name, _, inline = token[2:].partition("=")
            if inline:
                fields[name.replace("-", "_")] = _value(inline)
                name = None
        elif name is not None:
            fields[name.replace("-", "_")] = _value(token)
            name = None
        else:
            raise SystemExit(f"afterward: expected --field value, got {token!r}")
    if name is not None:
        raise SystemExit(f"afterward: --{name} needs a value")
    return fields


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


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
