"""Operations commands: `flower`, `documents scan|status|export`, `demo`."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from core.settings import get_settings
from sheepdog.cli.output import edge, fail, print_json


def register(app: typer.Typer) -> None:
    """Add `flower`, `demo` and the `documents` group to the CLI."""
    app.command()(flower)
    app.command()(demo)
    docs = typer.Typer(help="The nightly documents job.", no_args_is_help=True)
    docs.command("scan")(documents_scan)
    docs.command("status")(documents_status)
    docs.command("export")(documents_export)
    app.add_typer(docs, name="documents")


# -- flower ---------------------------------------------------------------------------------


def is_loopback(address: str) -> bool:
    """True when `address` (a name or an IP) only listens on this machine."""
    if address in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(address, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def flower(
    port: Annotated[int, typer.Option(help="HTTP port.")] = 5555,
    address: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Run without basic auth (loopback address only).")
    ] = False,
) -> None:
    """Run Flower on Sheepdog's Celery app, behind basic auth (SHEEPDOG_FLOWER_BASIC_AUTH)."""
    from core.redis_conn import check_redis

    secret = get_settings().flower_basic_auth
    auth = secret.get_secret_value() if secret else ""
    # Flower reads FLOWER_* variables itself; the password never appears on a command line.
    os.environ.pop("FLOWER_BASIC_AUTH", None)
    if no_auth:
        if not is_loopback(address):
            fail(f"--no-auth is only allowed on a loopback address, not {address}")
    elif not auth:
        fail("set SHEEPDOG_FLOWER_BASIC_AUTH=user:password (or --no-auth on 127.0.0.1)")
    elif ":" not in auth or auth.startswith(":") or auth.endswith(":") or "," in auth:
        fail("SHEEPDOG_FLOWER_BASIC_AUTH must be user:password (no commas)")
    else:
        os.environ["FLOWER_BASIC_AUTH"] = auth
    with edge():
        check_redis()
    from workers.app import worker_app

    app = worker_app()

    app.start(argv=["flower", f"--port={port}", f"--address={address}"])


# -- documents ------------------------------------------------------------------------------


def documents_scan(
    glob: Annotated[
        str | None, typer.Option(help="`|`-separated globs (default: SHEEPDOG_DOCUMENTS_GLOB).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Scan now: send each new or changed document for a summary (the nightly job, by hand)."""
    from documents.scan import scan_documents

    with edge():
        report = scan_documents(get_settings(), patterns=glob)
    if as_json:
        print_json(report.as_dict())
    else:
        for item in report.items:
            extra = item.get("reason") or (f"{item['parts']} part(s)" if "parts" in item else "")
            typer.echo(f"{item['action']:<9} {item['path']}  {extra}".rstrip())
        typer.echo(
            f"{report.found} found: {report.new} new, {report.changed} changed, "
            f"{report.retried} retried, {report.unchanged} unchanged, {report.refused} refused; "
            f"{report.requests} requests enqueued"
        )
    if report.error:
        fail(report.error, 1)


def _views() -> list:
    from core.db import check_database, session_scope
    from documents.status import refresh

    check_database()
    with session_scope() as session:
        return refresh(session)


def documents_status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a document.")] = False,
) -> None:
    """Each document's state: pending, succeeded, failed, cancelled, refused (with the reason)
    or error."""
    from rich.console import Console
    from rich.table import Table

    from documents.status import counts

    with edge():
        views = _views()
    if as_json:
        for v in views:
            print_json(v.model_dump(exclude={"summary"}))
        return
    table = Table(title=f"documents ({len(views)})")
    for col in ("path", "title", "status", "parts", "note"):
        table.add_column(col)
    for v in views:
        parts = (
            f"{v.done_parts}/{v.parts}" if v.status in ("pending", "succeeded") else str(v.parts)
        )
        table.add_row(v.path, v.title[:40], v.status, parts, (v.error or "")[:60])
    Console().print(table)
    typer.echo(", ".join(f"{n} {s}" for s, n in sorted(counts(views).items())) or "no documents")


def documents_export(
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    output: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Write path, title, hash, status and summary (parts joined) of every document."""
    from documents.status import export

    if fmt not in ("jsonl", "csv"):
        fail(f"unknown format {fmt!r}; use jsonl or csv")
    with edge():
        text = export(_views(), fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as err:  # a missing folder, a full disk: one line, not a traceback
            fail(f"cannot write {output}: {err.strerror or err}")
        typer.echo(f"wrote {output}", err=True)


# -- demo -----------------------------------------------------------------------------------


def demo(
    db: Annotated[str, typer.Option(help="SQLite file for the demo.")] = "var/demo.db",
    redis_db: Annotated[int, typer.Option(help="Redis database number (flushed).")] = 2,
    docs: Annotated[str, typer.Option(help="Documents folder.")] = "samples/docs",
    timeout: Annotated[
        float,
        typer.Option(help="Give up when the workload has not ended this long after start-up."),
    ] = 110.0,
) -> None:
    """The whole system on one machine: simulator, workers, beat, a mixed workload, the bill."""
    from sheepdog.demo import run_demo

    code = run_demo(db_path=db, redis_db=redis_db, docs_dir=docs, timeout=timeout)
    raise typer.Exit(code)
