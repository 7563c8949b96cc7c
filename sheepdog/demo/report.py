"""What the demo prints about its run: the start banner, the documents' summaries, the final
tally of requests, live metrics, the bill, where to look next and the verdict."""

from __future__ import annotations

import subprocess
import urllib.request
from typing import TYPE_CHECKING

from rich.panel import Panel
from rich.table import Table

from sheepdog.demo.console import console
from sheepdog.demo.processes import ROOT, SHEEPDOG

if TYPE_CHECKING:
    from pathlib import Path

    from core.settings import Settings


def show_started(
    provider: str, model: str, db_file: Path, redis_url: str, logs: Path, elapsed: float
) -> None:
    """The banner once every process is up, `elapsed` seconds after the demo started."""
    console.print(
        Panel.fit(
            f"[bold]Sheepdog demo[/]  provider: {provider}  model: {model}\n"
            f"database: {db_file}  redis: {redis_url}\n"
            f"stream worker (threads, queue stream), batch worker (queues batch,default), beat\n"
            f"logs: {logs}",
            title=f"up in {elapsed:.1f} s",
        )
    )


def show_documents(settings: Settings) -> None:
    """Each document's status and the first words of its summary."""
    from core.db import session_scope
    from documents.status import refresh

    with session_scope(settings.database_url) as session:
        views = refresh(session)
    table = Table(
        title=f"documents ({len(views)}): sheepdog documents status | export", title_justify="left"
    )
    table.add_column("document", no_wrap=True)
    table.add_column("status")
    table.add_column("summary (first words)", no_wrap=True, overflow="ellipsis")
    for v in views:
        summary = (v.summary or v.error or "").replace("\n", " ")
        table.add_row(v.title[:38], v.status, summary[:50] + ("…" if len(summary) > 50 else ""))
    console.print(table)


def final_check(settings: Settings, ids: list[str]) -> bool:
    """Print the requests by status; True when every one was recorded and succeeded."""
    from sqlalchemy import func, select

    from core.db import session_scope
    from models.tables import Request

    with session_scope(settings.database_url) as session:
        counts = dict(
            session.execute(select(Request.status, func.count()).group_by(Request.status)).all()
        )
        missing = len(set(ids)) - (
            session.scalar(select(func.count()).where(Request.id.in_(ids))) or 0
        )
    total = sum(counts.values())
    console.print(
        f"requests: {total} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})"
        + (f"; [red]{missing} never recorded[/]" if missing else "")
    )
    return missing == 0 and total > 0 and counts.get("succeeded", 0) == total


def show_metrics(port: int) -> None:
    """A few lines from the stream worker's live /metrics, before it stops."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError as err:
        console.print(f"[dim]metrics endpoint not reachable: {err}[/]")
        return
    wanted = (
        "sheepdog_requests{",
        "sheepdog_cost_usd_total",
        "sheepdog_time_to_first_token_seconds_count",
    )
    lines = [line for line in text.splitlines() if line.startswith(wanted)]
    console.print(Panel("\n".join(lines[:12]) or "(no samples)", title=f"/metrics on port {port}"))


def show_costs(env: dict[str, str]) -> None:
    """The cost report (`sheepdog costs`), or a plain summary of the ledger without it."""
    out = subprocess.run(
        [*SHEEPDOG, "costs", "--by", "route"],
        cwd=ROOT,
        env={**env, "COLUMNS": str(console.width)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode == 0 and out.stdout.strip():
        console.print(out.stdout.rstrip())
    else:
        console.print(_ledger_by_route(env["SHEEPDOG_DATABASE_URL"]))


def _ledger_by_route(database_url: str) -> Table:
    """Costs by route straight from the ledger, with what the batch path saved."""
    from sqlalchemy import func, select

    from core.db import session_scope
    from models.tables import CostEntry

    with session_scope(database_url) as session:
        rows = session.execute(
            select(
                CostEntry.route,
                func.count(),
                func.sum(CostEntry.cost_usd),
                func.sum(CostEntry.standard_cost_usd),
            ).group_by(CostEntry.route)
        ).all()
    table = Table(title="costs by route (ledger)", title_justify="left")
    for col in ("route", "requests", "cost USD", "at standard rate", "saved"):
        table.add_column(col, justify="right")
    for route, n, cost, std in rows:
        table.add_row(
            route,
            str(n),
            f"{float(cost or 0):.6f}",
            f"{float(std or 0):.6f}",
            f"{float((std or 0) - (cost or 0)):.6f}",
        )
    return table


def show_where_next(metrics_port: int) -> None:
    """The commands to look further; `metrics_port` is the configured one (the demo's is gone)."""
    console.print(
        Panel.fit(
            "Flower (tasks, workers, queues):  SHEEPDOG_FLOWER_BASIC_AUTH=admin:secret "
            "sheepdog flower --port 5555\n"
            f"Metrics (each worker):            curl http://127.0.0.1:{metrics_port}/metrics\n"
            "Requests:                         sheepdog status  |  sheepdog status ID --json\n"
            "HTTP front door:                  sheepdog keys create --tenant T; sheepdog api\n"
            "Batches / costs / documents:      sheepdog batches | sheepdog costs | "
            "sheepdog documents status\n"
            "Everything at once:               docker-compose up",
            title="where to look next",
        )
    )


def show_verdict(ok: bool, elapsed: float) -> None:
    verdict = (
        "[bold green]all requests succeeded[/]"
        if ok
        else "[bold red]not every request succeeded[/]"
    )
    console.print(f"{verdict} in {elapsed:.1f} s")
