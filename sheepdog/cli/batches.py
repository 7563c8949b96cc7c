"""Batch commands: `batches` (the jobs and their progress) and `flush` (submit what is queued)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from sheepdog.cli.output import edge, fail, print_json


def register(app: typer.Typer) -> None:
    app.command()(batches)
    app.command()(flush)


def _age(since: datetime | None) -> str:
    if since is None:
        return "-"
    seconds = int((datetime.now(UTC) - since).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def job_rows(limit: int, open_only: bool = False) -> list[dict[str, Any]]:
    """The newest batch jobs as plain dicts (what `batches --json` prints)."""
    from sqlalchemy import select

    from core.db import check_database, session_scope
    from models.status import BATCH_FINAL as FINAL
    from models.tables import BatchJob

    check_database()
    with session_scope() as session:
        stmt = select(BatchJob).order_by(BatchJob.created_at.desc()).limit(limit)
        if open_only:
            stmt = stmt.where(BatchJob.status.not_in(FINAL))
        jobs = session.scalars(stmt).all()
        return [
            {
                "id": j.id,
                "model": j.model,
                "provider": j.provider,
                "mode": j.mode,
                "status": j.status,
                "provider_batch_id": j.provider_batch_id,
                "request_count": j.request_count,
                "completed_count": j.completed_count,
                "failed_count": j.failed_count,
                "ingested_count": j.ingested_count,
                "malformed_lines": j.malformed_lines,
                "input_bytes": j.input_bytes,
                "cost_usd": None if j.cost_usd is None else format(j.cost_usd.normalize(), "f"),
                "created_at": j.created_at.isoformat(),
                "submitted_at": j.submitted_at.isoformat() if j.submitted_at else None,
                "finished_at": j.finished_at.isoformat() if j.finished_at else None,
                "ingested_at": j.ingested_at.isoformat() if j.ingested_at else None,
                "age": _age(j.created_at),
            }
            for j in jobs
        ]


def batches(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    limit: Annotated[int, typer.Option(help="Show the newest N jobs.")] = 50,
    open_only: Annotated[bool, typer.Option("--open", help="Only jobs not yet final.")] = False,
) -> None:
    """List batch jobs: id, model, status, counts, age and cost."""
    with edge():
        rows = job_rows(limit, open_only)
    if as_json:
        print_json({"batches": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"batch jobs ({len(rows)})")
    for name, justify in [
        ("id", "left"),
        ("model", "left"),
        ("provider/mode", "left"),
        ("status", "left"),
        ("done/failed/total", "right"),
        ("ingested", "right"),
        ("age", "right"),
        ("cost $", "right"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            r["id"],
            r["model"],
            f"{r['provider']}/{r['mode']}",
            r["status"],
            f"{r['completed_count']}/{r['failed_count']}/{r['request_count']}",
            "yes" if r["ingested_at"] else "-",
            r["age"],
            r["cost_usd"] or "-",
        )
    Console().print(table)


def flush(
    wait: Annotated[
        bool, typer.Option("--wait", help="Then wait until the new jobs are ingested.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Give up waiting after this many seconds.")] = 0,
) -> None:
    """Submit every queued low-priority request now (as the beat and threshold flushes do)."""
    from batch.flush import flush as run_flush
    from core.db import check_database
    from core.settings import get_settings

    with edge():
        check_database()
        report = run_flush(get_settings())
    typer.echo(report.summary())
    for job in report.jobs:
        what = "adopted" if job.adopted else f"{job.lines} lines, {job.bytes:,} bytes"
        typer.echo(f"  {job.job_id}  {job.model}  {what}  -> {job.provider_batch_id or '-'}")
    if wait and report.jobs:
        _wait_ingested([j.job_id for j in report.jobs], timeout or None)


def _wait_ingested(job_ids: list[str], timeout: float | None) -> None:
    """Poll the jobs until each is ingested (the workers' poll and ingest do the work)."""
    from sqlalchemy import select

    from core.db import session_scope
    from models.tables import BatchJob

    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(job_ids)
    while pending:
        with edge(), session_scope() as session:
            done = session.execute(
                select(BatchJob.id, BatchJob.status, BatchJob.cost_usd).where(
                    BatchJob.id.in_(pending), BatchJob.ingested_at.is_not(None)
                )
            ).all()
        for job_id, status, cost in done:
            typer.echo(f"  {job_id}  {status}, ingested, cost ${cost or 0}")
            pending.discard(job_id)
        if pending and deadline is not None and time.monotonic() > deadline:
            fail(f"{len(pending)} job(s) not ingested after {timeout}s", 1)
        if pending:
            time.sleep(1.0)
