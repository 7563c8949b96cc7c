"""Request commands: `submit`, `status`, `follow`, `cancel`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from core.errors import InvalidRequest
from sheepdog.cli.output import edge, fail, print_json


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command()(status)
    app.command()(follow)
    app.command()(cancel)


def read_request_file(path: Path) -> list[dict[str, Any]]:
    """One request object a line; blank lines skipped. InvalidRequest names the bad line.

    Any readable file works: a regular file, `/dev/null` (no requests), a pipe or process
    substitution (`--file <(...)`), or `-` for standard input."""
    from core.strict_json import loads

    if str(path) != "-" and not path.exists():
        raise InvalidRequest(f"no such file: {path}")
    if path.is_dir():
        raise InvalidRequest(f"{path} is a directory, not a file of requests")
    requests: list[dict[str, Any]] = []
    try:
        fh = sys.stdin.buffer if str(path) == "-" else path.open("rb")
    except OSError as err:
        raise InvalidRequest(f"cannot read {path}: {err.strerror}") from None
    with fh:
        try:
            for number, raw in enumerate(fh, start=1):
                requests.extend(_line(path, number, raw, loads))
        except OSError as err:  # a read that fails midway (EIO, a special file)
            raise InvalidRequest(f"cannot read {path}: {err.strerror or err}") from None
    if not requests:
        raise InvalidRequest(f"{path}: no requests in the file")
    return requests


def _line(path: Path, number: int, raw: bytes, loads: Any) -> list[dict[str, Any]]:
    """The request on one line of the file (none for a blank line)."""
    try:
        line = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{path}:{number}: not UTF-8 text") from None
    if not line.strip():
        return []
    obj = loads(line, f"{path}:{number}")
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{path}:{number}: expected a JSON object")
    return [obj]


def submit(
    model: Annotated[str | None, typer.Option(help="Model name from the price table.")] = None,
    prompt: Annotated[str | None, typer.Option(help="The user message.")] = None,
    system: Annotated[str | None, typer.Option(help="An optional system message.")] = None,
    priority: Annotated[str, typer.Option(help="high, normal or low.")] = "normal",
    lane: Annotated[
        str | None, typer.Option(help="priority: a high request asks for the priority lane.")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Output token limit.")] = None,
    max_cost_usd: Annotated[str | None, typer.Option(help="Cost cap in USD.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Deduplicates resubmits.")] = None,
    tenant: Annotated[str | None, typer.Option(help="metadata.tenant for budgets.")] = None,
    file: Annotated[Path | None, typer.Option(help="JSONL file, one request a line.")] = None,
    follow_: Annotated[
        bool, typer.Option("--follow", help="Print the answer live (stream route).")
    ] = False,
) -> None:
    """Validate and enqueue requests; print one request id a line."""
    from sheepdog.client import Client

    with edge():
        if file is not None:
            if model or prompt or system:
                raise InvalidRequest("give either --file or --model/--prompt, not both")
            requests = read_request_file(file)
        else:
            if not model or prompt is None:
                raise InvalidRequest("--model and --prompt are required (or --file)")
            messages = [{"role": "system", "content": system}] if system is not None else []
            messages.append({"role": "user", "content": prompt})
            request: dict[str, Any] = {"model": model, "messages": messages, "priority": priority}
            if lane is not None:
                request["lane"] = lane
            if max_tokens is not None:
                request["max_tokens"] = max_tokens
            if max_cost_usd is not None:
                request["max_cost_usd"] = max_cost_usd
            if idempotency_key is not None:
                request["idempotency_key"] = idempotency_key
            if tenant is not None:
                request["metadata"] = {"tenant": tenant}
            requests = [request]
        if follow_:
            _check_followable(requests)
        client = Client()
        ids = client.submit_many(requests)
    for rid in ids:
        typer.echo(rid)
    if follow_:
        _follow(client, ids[0])


def _check_followable(requests: list[dict[str, Any]]) -> None:
    """--follow streams one answer: refuse (before anything is sent) what it could not follow."""
    if len(requests) != 1:
        raise InvalidRequest(f"--follow takes a single request, the file has {len(requests)}")
    if requests[0].get("priority") == "low":
        raise InvalidRequest(
            "--follow streams high or normal priority requests; a low-priority one is answered "
            "by a batch (minutes to hours): submit it without --follow, then `sheepdog status ID`"
        )


def _follow(client: Any, request_id: str, timeout: float = 600.0) -> None:
    from streaming.subscriber import Reset, StreamFailed

    with edge():
        try:
            for text in client.stream(request_id, timeout=timeout):
                # A retry restarts the answer: say so rather than leave the old text dangling.
                sys.stdout.write("\n[restarting]\n" if isinstance(text, Reset) else text)
                sys.stdout.flush()
        except StreamFailed:
            pass  # the row below says how it ended
        sys.stdout.write("\n")
        view = client.get(request_id)
    if view is not None and view.status != "succeeded":
        fail(f"request {request_id} ended {view.status}: {view.error or ''}".rstrip(": "), 1)


def follow(
    request_id: Annotated[str, typer.Argument(help="The request id.")],
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600.0,
) -> None:
    """Print a streaming request's answer live (from the start, even if it is already done)."""
    from models.request import check_request_id
    from sheepdog.client import Client

    with edge():
        check_request_id(request_id)
    _follow(Client(), request_id, timeout)


def cancel(request_id: Annotated[str, typer.Argument(help="The request id.")]) -> None:
    """Cancel a request: a queued one never starts, an in-flight stream stops within a second."""
    from sheepdog.client import Client

    with edge():
        outcome = Client().cancel_outcome(request_id)
    if outcome == "not recorded":
        typer.echo(
            f"not recorded: no request {request_id} is known yet (if it is still in the queue, "
            "it will not start)"
        )
        return
    typer.echo(outcome)


def status(
    request_id: Annotated[str | None, typer.Argument(help="A request id; none: a summary.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Show one request, or counts by status and route."""
    from sheepdog.client import Client

    with edge():
        if request_id is None:
            summary = _summary()
            if as_json:
                print_json(summary)
            else:
                _print_summary(summary)
            return
        from models.request import check_request_id

        view = Client().get(check_request_id(request_id))
    if view is None:
        fail(f"no request {request_id} (it may still be in the intake queue)", 1)
    if as_json:
        print_json(view.model_dump(mode="json"))
        return
    typer.echo(f"{view.id}  {view.status}  {view.priority}/{view.route}  {view.model}")
    if view.usage:
        est = " (estimated)" if view.usage.estimated else ""
        typer.echo(
            f"usage: {view.usage.prompt_tokens} in, {view.usage.completion_tokens} out{est};"
            f" cost ${view.cost_usd or 0}"
        )
    if view.lane_reason:
        typer.echo(f"lane: {view.lane} ({view.lane_reason})")
    if view.error:
        typer.echo(f"error: {view.error}")
    if view.text:
        typer.echo(view.text)


def _summary() -> dict[str, Any]:
    from sqlalchemy import func, select

    from core.db import check_database, session_scope
    from models.tables import Request

    check_database()
    with session_scope() as session:
        rows = session.execute(
            select(Request.route, Request.status, func.count()).group_by(
                Request.route, Request.status
            )
        ).all()
    counts: dict[str, dict[str, int]] = {}
    for route, state, n in rows:
        counts.setdefault(route, {})[state] = n
    return {"by_route": counts, "total": sum(n for _, _, n in rows)}


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    statuses = ["queued", "streaming", "batched", "succeeded", "failed", "cancelled"]
    table = Table(title=f"requests ({summary['total']})")
    table.add_column("route")
    for s in statuses:
        table.add_column(s, justify="right")
    for route, counts in sorted(summary["by_route"].items()):
        table.add_row(route, *(str(counts.get(s, 0)) for s in statuses))
    Console().print(table)
