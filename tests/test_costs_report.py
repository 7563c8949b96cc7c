"""The cost report, its plot and the `sheepdog costs` CLI against a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from core.db import session_scope
from core.settings import Settings, get_settings
from costs.budgets import reserve
from costs.ledger import Usage, record
from costs.plot import plot_daily
from costs.report import cost_lines, cost_report, daily_by_route
from models.tables import CostEntry
from tests.fixtures.costs import budget, insert_rows, make_item

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def spend_some(url: str, tenant: str) -> list[Usage]:
    """Six finished requests of the tenant on two models and both routes."""
    settings = Settings(database_url=url)
    items = [make_item(settings, tenant, priority=p) for p in ("normal", "low") * 3]
    insert_rows(url, items)
    usages = [
        Usage(item.id, tenant, model, item.route, 1000 * (n + 1), 500 * (n + 1))  # type: ignore[arg-type]
        for n, (item, model) in enumerate(
            zip(items, ["gpt-4.1", "gpt-4.1-mini", "sheepdog-mini"] * 2, strict=True)
        )
    ]
    with session_scope(url) as session:
        record(session, usages)
    return usages


def test_report_totals_equal_the_ledger(db_url: str, tenant: str) -> None:
    spend_some(db_url, tenant)
    with session_scope(db_url) as session:
        mine = session.execute(
            select(
                func.count(),
                func.sum(CostEntry.cost_usd),
                func.sum(CostEntry.standard_cost_usd),
                func.sum(CostEntry.completion_tokens),
            ).where(CostEntry.tenant == tenant)
        ).one()
        rows = list(session.scalars(select(CostEntry).where(CostEntry.tenant == tenant)))
        report = cost_report(session, Settings(database_url=db_url), None, "tenant")
        by_model = cost_lines(session, None, "model")
        by_day = cost_lines(session, None, "day")
    [line] = [x for x in report.lines if x.key == tenant]
    assert line.requests == mine[0] == 6
    assert line.cost_usd == sum((r.cost_usd for r in rows), Decimal(0))
    assert line.standard_cost_usd == sum((r.standard_cost_usd for r in rows), Decimal(0))
    assert line.completion_tokens == mine[3]
    assert line.savings_usd > 0 and 0 < line.savings_pct < 50
    for lines in (report.lines, by_model, by_day):  # every grouping adds up to the same totals
        assert sum((x.cost_usd for x in lines), Decimal(0)) == report.total.cost_usd
        assert sum(x.requests for x in lines) == report.total.requests
    assert by_day[-1].key == datetime.now(UTC).strftime("%Y-%m-%d")


def test_budget_use_shows_spent_held_limit_left(db_url: str, tenant: str) -> None:
    settings = Settings(database_url=db_url)
    budget(db_url, tenant, daily_usd="5", monthly_usd="50")
    spend_some(db_url, tenant)
    [held] = reserve([make_item(settings, tenant, max_tokens=1000)], settings)
    with session_scope(db_url) as session:
        report = cost_report(session, settings, None, "model")
    [use] = [b for b in report.budgets if b.tenant == tenant]
    assert use.daily is not None and use.monthly is not None
    assert use.daily.limit_usd == 5 and use.monthly.limit_usd == 50
    assert use.daily.spent_usd == use.monthly.spent_usd > 0
    assert use.daily.held_usd > 0
    assert use.daily.left_usd == 5 - use.daily.spent_usd - use.daily.held_usd
    assert held.route == "stream"


def test_plot_is_a_png_written_by_matplotlib(pg_url: str, tenant: str, tmp_path: Path) -> None:
    spend_some(pg_url, tenant)
    with session_scope(pg_url) as session:
        rows = daily_by_route(session, datetime.now(UTC) - timedelta(days=3))
    assert {route for _, route, _ in rows} >= {"stream", "batch"}
    out = plot_daily(rows, tmp_path / "costs.png")
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert b"Matplotlib" in data[:2000]  # the tEXt Software chunk matplotlib writes
    empty = plot_daily([], tmp_path / "empty.png")
    assert empty.read_bytes().startswith(PNG_SIGNATURE)


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> Iterator[dict[str, str]]:
    monkeypatch.setenv("SHEEPDOG_DATABASE_URL", pg_url)
    get_settings.cache_clear()
    yield {"SHEEPDOG_DATABASE_URL": pg_url}
    get_settings.cache_clear()


def run_cli(*args: str) -> tuple[int, str]:
    from sheepdog.cli import build_app

    app = build_app()
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_budget_set_list_and_costs_json(cli_env: dict[str, str], tenant: str) -> None:
    code, out = run_cli("costs", "budget", "set", tenant, "--daily", "2.50", "--allow-downgrade")
    assert code == 0 and out.strip() == (
        f"{tenant}: daily $2.50, monthly unlimited, downgrade allowed"
    )
    code, out = run_cli("costs", "budget", "set", tenant, "--monthly", "40")
    assert code == 0 and "daily $2.50, monthly $40.00, downgrade allowed" in out
    code, out = run_cli("costs", "budget", "list", "--json")
    listed = {b["tenant"]: b for b in json.loads(out)["budgets"]}
    assert code == 0 and Decimal(listed[tenant]["monthly_usd"]) == 40
    code, out = run_cli("costs", "budget", "set", tenant, "--daily", "-1")
    assert code == 2 and "non-negative" in out

    spend_some(cli_env["SHEEPDOG_DATABASE_URL"], tenant)
    code, out = run_cli("costs", "--json", "--by", "tenant", "--since", "1d")
    assert code == 0, out
    report = json.loads(out)
    assert report["by"] == "tenant" and set(report["totals"]) >= {
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "standard_cost_usd",
        "savings_usd",
        "savings_pct",
    }
    [row] = [r for r in report["rows"] if r["key"] == tenant]
    assert row["requests"] == 6
    assert Decimal(row["savings_usd"]) == Decimal(row["standard_cost_usd"]) - Decimal(
        row["cost_usd"]
    )
    [use] = [b for b in report["budgets"] if b["tenant"] == tenant]
    assert Decimal(use["daily"]["limit_usd"]) == Decimal("2.5")
    assert Decimal(use["daily"]["left_usd"]) == Decimal("2.5") - Decimal(row["cost_usd"])

    code, out = run_cli("costs", "--by", "route", "--since", "2000-01-01")
    assert code == 0 and "total" in out and "saved" in out and "budget use" in out
    code, out = run_cli("costs", "--by", "colour")
    assert code == 2 and "unknown grouping" in out


def test_costs_json_as_a_real_program(pg_url: str, tenant: str, tmp_path: Path) -> None:
    spend_some(pg_url, tenant)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env["SHEEPDOG_DATABASE_URL"] = pg_url
    plot = tmp_path / "p.png"
    result = subprocess.run(
        [sys.executable, "-m", "sheepdog", "costs", "--json", "--by", "day", "--plot", str(plot)],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert report["plot"] == str(plot) and plot.read_bytes().startswith(PNG_SIGNATURE)
    assert report["totals"]["requests"] >= 6
