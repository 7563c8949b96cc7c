"""`sheepdog costs`: the cost report, and `sheepdog costs budget set|list` for tenant budgets."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import typer

from sheepdog.cli.output import edge, fail, print_json

DEFAULT_DAYS = 30


def register(app: typer.Typer) -> None:
    costs_app = typer.Typer(
        help="Cost report and tenant budgets.", invoke_without_command=True, no_args_is_help=False
    )
    costs_app.callback()(costs)
    budget = typer.Typer(help="Tenant budgets (daily / monthly USD).", no_args_is_help=True)
    budget.command("set")(budget_set)
    budget.command("list")(budget_list)
    budget.command("release-stale")(budget_release_stale)
    costs_app.add_typer(budget, name="budget")
    app.add_typer(costs_app, name="costs")


def parse_since(text: str) -> datetime:
    """YYYY-MM-DD, an ISO datetime, or a relative `7d` / `12h` (UTC)."""
    from models.tables import in_utc

    match = re.fullmatch(r"(\d+)([dh])", text.strip())
    try:
        if match:
            n, unit = int(match[1]), match[2]
            return datetime.now(UTC) - (timedelta(days=n) if unit == "d" else timedelta(hours=n))
        when = datetime.fromisoformat(text)
        return in_utc(when)
    except (ValueError, OverflowError):  # past the years a datetime holds, in UTC included
        fail(f"--since: expected YYYY-MM-DD, an ISO datetime or e.g. 7d, got {text!r}")


def costs(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option(help=f"Start: YYYY-MM-DD or 7d (default: {DEFAULT_DAYS}d).")
    ] = None,
    by: Annotated[str, typer.Option(help="Group by model, tenant, route, lane or day.")] = "model",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Also write a PNG: cost and savings per day by lane.")
    ] = None,
) -> None:
    """Requests, tokens, cost, savings against the standard rate, and budget use."""
    if ctx.invoked_subcommand is not None:
        return
    from core.db import check_database, session_scope
    from core.settings import get_settings
    from costs.report import GROUPS, cost_report, daily_by_route

    if by not in GROUPS:
        fail(f"--by: unknown grouping {by!r}; use one of {', '.join(GROUPS)}")
    if plot is not None:
        _require_plot()
        if plot.is_dir() or not plot.parent.is_dir():
            fail(f"--plot: {plot} is not a file in an existing folder")
    start = parse_since(since) if since else datetime.now(UTC) - timedelta(days=DEFAULT_DAYS)
    settings = get_settings()
    with edge():
        check_database(settings.database_url)
        with session_scope(settings.database_url) as session:
            report = cost_report(session, settings, start, by)  # type: ignore[arg-type]
            daily = daily_by_route(session, start, by="lane") if plot is not None else []
    if plot is not None:
        from costs.plot import plot_daily

        plot_daily(daily, plot)
    if as_json:
        print_json(report.to_json() | ({"plot": str(plot)} if plot is not None else {}))
        return
    _print_report(report)
    if plot is not None:
        typer.echo(f"plot written to {plot}")


def _require_plot() -> None:
    """Refuse --plot before any work when matplotlib (the `plot` extra) is missing."""
    from costs.plot import PlotUnavailable, require_matplotlib

    try:
        require_matplotlib()
    except PlotUnavailable as err:
        fail(str(err))


def _print_report(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from costs.budgets import money

    console = Console()
    since = report.since.strftime("%Y-%m-%d %H:%M UTC") if report.since else "the beginning"
    table = Table(title=f"costs since {since}, by {report.by}", title_justify="left")
    table.add_column(report.by, no_wrap=True)
    for name in ("requests", "input tok", "output tok", "cost", "at standard", "saved", "saved %"):
        table.add_column(name, justify="right")
    for line in [*report.lines, report.total]:
        is_total = line is report.total
        est = f" ({line.estimated} est.)" if line.estimated else ""
        table.add_row(
            line.key + est,
            f"{line.requests:,}",
            f"{line.prompt_tokens:,}",
            f"{line.completion_tokens:,}",
            money(line.cost_usd),
            money(line.standard_cost_usd),
            f"[bold green]{money(line.savings_usd)}[/]" if line.savings_usd else money(Decimal(0)),
            f"[bold green]{line.savings_pct}%[/]" if line.savings_usd else "0%",
            style="bold" if is_total else None,
            end_section=line is (report.lines[-1] if report.lines else None),
        )
    console.print(table)
    console.print(_lanes_table(report.lanes))
    if not report.budgets:
        console.print("no tenant budgets set (sheepdog costs budget set TENANT --daily X)")
        return
    budgets = Table(title="budget use (UTC day / month)", title_justify="left")
    budgets.add_column("tenant", no_wrap=True)
    budgets.add_column("period")
    for name in ("spent", "held", "limit", "left"):
        budgets.add_column(name, justify="right")
    budgets.add_column("downgrade")
    for use in report.budgets:
        for period, p in (("daily", use.daily), ("monthly", use.monthly)):
            if p is None:
                continue
            colour = "red" if p.left_usd <= 0 else "yellow" if p.left_usd < p.limit_usd / 10 else ""
            left = money(p.left_usd)
            budgets.add_row(
                use.tenant,
                period,
                money(p.spent_usd),
                money(p.held_usd),
                money(p.limit_usd),
                f"[{colour}]{left}[/]" if colour else left,
                "yes" if use.allow_downgrade else "no",
            )
    console.print(budgets)


def _lanes_table(summary: Any) -> Any:
    """One row: the cost of each lane, what was paid, and the same requests all-standard and
    all-priority."""
    from rich.table import Table

    from costs.budgets import money
    from models.intake_message import LANES

    table = Table(title="by lane, and the same requests at one rate", title_justify="left")
    cells = []
    for lane in LANES:
        table.add_column(lane, justify="right")
        cost = summary.lanes.get(lane)
        cells.append(f"{money(cost.cost_usd)} ({cost.requests:,})" if cost else "-")
    for name in ("paid", "all standard", "all priority", "saved"):
        table.add_column(name, justify="right")
    cells += [
        money(summary.paid_usd),
        money(summary.all_standard_usd),
        money(summary.all_priority_usd),
        f"[bold green]{money(summary.saved_usd)}[/]",
    ]
    table.add_row(*cells)
    return table


def _usd_option(name: str, text: str | None) -> Decimal | None:
    if text is None or text.lower() in {"none", "off", "unlimited"}:
        return None
    try:
        value = Decimal(text.removeprefix("$"))
    except InvalidOperation:
        fail(f"--{name}: expected an amount in USD (or 'none'), got {text!r}")
    if not value.is_finite() or value < 0:
        fail(f"--{name}: expected a non-negative amount in USD, got {text!r}")
    return value


def budget_set(
    tenant: Annotated[str, typer.Argument(help="The tenant (metadata.tenant; 'default').")],
    daily: Annotated[str | None, typer.Option(help="USD per UTC day ('none' clears).")] = None,
    monthly: Annotated[str | None, typer.Option(help="USD per UTC month ('none' clears).")] = None,
    allow_downgrade: Annotated[
        bool | None,
        typer.Option(
            "--allow-downgrade/--no-allow-downgrade",
            help="Downgrade normal-priority requests to batch (half price) instead of refusing.",
        ),
    ] = None,
) -> None:
    """Create or change a tenant's budget; options left out keep their value."""
    from core.db import check_database, session_scope
    from core.settings import get_settings
    from costs.budget_limits import set_budget

    if daily is None and monthly is None and allow_downgrade is None:
        fail("give --daily, --monthly and/or --allow-downgrade")
    clear = [n for n, v in (("daily", daily), ("monthly", monthly)) if v is not None]
    url = get_settings().database_url
    with edge():
        check_database(url)
        with session_scope(url) as session:
            row = set_budget(
                session,
                tenant,
                daily_usd=_usd_option("daily", daily),
                monthly_usd=_usd_option("monthly", monthly),
                allow_downgrade=allow_downgrade,
                clear=clear,
            )
            typer.echo(_budget_line(row))


def _budget_line(row: Any) -> str:
    from costs.budgets import money

    def show(v: Decimal | None) -> str:
        return money(v) if v is not None else "unlimited"

    return (
        f"{row.tenant}: daily {show(row.daily_usd)}, monthly {show(row.monthly_usd)},"
        f" downgrade {'allowed' if row.allow_downgrade else 'refused'}"
    )


def budget_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Every tenant budget (and the settings default, if any)."""
    from core.db import check_database, session_scope
    from core.settings import get_settings
    from costs.budget_limits import list_budgets

    settings = get_settings()
    with edge():
        check_database(settings.database_url)
        with session_scope(settings.database_url) as session:
            rows = [
                r
                for r in list_budgets(session)
                if r.daily_usd is not None or r.monthly_usd is not None or r.allow_downgrade
            ]
    default = {
        "daily_usd": settings.default_daily_budget_usd,
        "monthly_usd": settings.default_monthly_budget_usd,
        "allow_downgrade": settings.default_budget_allow_downgrade,
    }
    if as_json:
        print_json(
            {
                "budgets": [
                    {
                        "tenant": r.tenant,
                        "daily_usd": r.daily_usd,
                        "monthly_usd": r.monthly_usd,
                        "allow_downgrade": r.allow_downgrade,
                    }
                    for r in rows
                ],
                "default": default,
            }
        )
        return
    for row in rows:
        typer.echo(_budget_line(row))
    if default["daily_usd"] is not None or default["monthly_usd"] is not None:
        typer.echo(
            f"(default for other tenants: daily {default['daily_usd'] or 'unlimited'},"
            f" monthly {default['monthly_usd'] or 'unlimited'})"
        )
    elif not rows:
        typer.echo("no budgets: every tenant is unlimited")


MIN_STALE = timedelta(minutes=15)


def budget_release_stale(
    hours: Annotated[float, typer.Option(help="Held longer than this many hours.")] = 1.0,
) -> None:
    """Release reservations whose request never reached a worker or ended unsettled."""
    from core.db import check_database, session_scope
    from core.settings import get_settings
    from costs.reservations import release_stale

    try:
        older = timedelta(hours=hours)
    except (OverflowError, ValueError):  # past what a time holds, or NaN
        fail(f"--hours: expected a number of hours a time can hold, got {hours:g}")
    if older < MIN_STALE:  # a newer hold may be a submit still under way: its row comes next
        fail(
            f"--hours: at least {MIN_STALE.total_seconds() / 3600:g}"
            f" (a newer hold may be a submit under way), got {hours:g}"
        )
    url = get_settings().database_url
    with edge():
        check_database(url)
        with session_scope(url) as session:
            n = release_stale(session, older)
    typer.echo(f"released {n} stale reservations")
