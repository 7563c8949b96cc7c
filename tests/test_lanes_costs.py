"""Budgets reserve at the dearest rate a lane may bill; the ledger bills the tier that served
each call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.settings import Settings
from costs.budgets import reserve, worst_case
from costs.ledger import Usage, record
from models.tables import CostEntry
from rules.prices import price_table
from tests.fixtures.costs import budget, make_item, reservations

TIERS = "flex,priority"


def lanes_settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, openai_service_tiers=TIERS)


def in_an_hour() -> str:
    return (datetime.now(UTC) + timedelta(hours=1)).isoformat()


@pytest.mark.unit
def test_worst_case_at_each_lane_rate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = lanes_settings(f"sqlite:///{tmp_path}/x.db")
    prices = price_table()
    stream = make_item(settings, "t")
    flex = make_item(settings, "t", priority="low", deadline=in_an_hour())
    priority = make_item(settings, "t", priority="high", lane="priority")
    assert (stream.lane, flex.lane, priority.lane) == ("stream", "flex", "priority")
    # Flex is billed at the batch rate, but may fall back to the standard lane: it is held
    # (and capped) at the standard rate, so a fallback never bills past its hold.
    assert worst_case(flex, prices) == worst_case(stream, prices)
    assert worst_case(flex, prices, "batch") * 2 == worst_case(stream, prices)
    assert worst_case(priority, prices) == worst_case(stream, prices) * Decimal("1.75")
    # Without tiers (a relay), the same low request escalates to the full-price stream.
    relay = make_item(
        Settings(database_url=settings.database_url), "t", priority="low", deadline=in_an_hour()
    )
    assert relay.lane == "stream" and relay.escalated


def test_reservations_hold_the_lane_rate(db_url: str, tenant: str) -> None:
    settings = lanes_settings(db_url)
    budget(db_url, tenant, daily_usd="10")
    items = [
        make_item(settings, tenant, priority="low", deadline=in_an_hour()),
        make_item(settings, tenant, priority="high", lane="priority"),
    ]
    reserve(items, settings)
    held = reservations(db_url, [i.id for i in items])
    for item in items:
        assert held[item.id].amount_usd == worst_case(item, price_table())
    assert held[items[0].id].amount_usd < held[items[1].id].amount_usd


def test_ledger_rows_by_served_tier(db_url: str, tenant: str) -> None:
    usages = [
        Usage(
            f"req_{tier[:4]}{tenant[-8:]}",
            tenant,
            "gpt-4.1",
            route,
            1_000_000,
            1_000_000,
            tier=tier,
        )  # type: ignore[arg-type]
        for route, tier in [
            ("stream", "standard"),
            ("stream", "flex"),
            ("stream", "priority"),
            ("batch", "batch"),
        ]
    ]
    with session_scope(db_url) as session:
        assert record(session, usages) == 4
    with session_scope(db_url) as session:
        got = {
            e.tier: (e.cost_usd, e.standard_cost_usd)
            for e in session.scalars(select(CostEntry).where(CostEntry.tenant == tenant))
        }
    ten = Decimal("10")
    assert got == {
        "standard": (ten, ten),
        "flex": (Decimal(5), ten),
        "batch": (Decimal(5), ten),
        "priority": (Decimal("17.5"), ten),
    }


@pytest.fixture
def fresh_db(tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A database of this test's own: the lane report sums the whole ledger."""
    from models.migrate import upgrade

    url = f"sqlite:///{tmp_path}/lanes.db"
    upgrade(url)
    return url


def one_of_each(url: str) -> None:
    usages = [
        Usage(f"req_{n:032x}", "t", "gpt-4.1", route, 1_000_000, 1_000_000, tier=tier)  # type: ignore[arg-type]
        for n, (route, tier) in enumerate(
            [
                ("stream", "standard"),
                ("stream", "flex"),
                ("stream", "priority"),
                ("batch", "batch"),
                ("stream", "flex"),
            ]
        )
    ]
    with session_scope(url) as session:
        record(session, usages)


def test_savings_report_has_a_column_per_lane_and_the_counterfactual(fresh_db: str) -> None:
    from costs.lanes_report import lane_summary
    from costs.report import cost_lines

    one_of_each(fresh_db)
    with session_scope(fresh_db) as session:
        summary = lane_summary(session, None)
        by_lane = {line.key: line for line in cost_lines(session, None, "lane")}
    assert {k: (v.requests, v.cost_usd) for k, v in summary.lanes.items()} == {
        "stream": (1, Decimal(10)),
        "flex": (2, Decimal(10)),
        "priority": (1, Decimal("17.5")),
        "batch": (1, Decimal(5)),
    }
    assert summary.paid_usd == Decimal("42.5")
    assert summary.all_standard_usd == Decimal(50)
    assert summary.all_priority_usd == Decimal("87.5")
    assert summary.saved_usd == Decimal("7.5")
    assert set(by_lane) == {"stream", "flex", "priority", "batch"}
    assert by_lane["flex"].savings_usd == Decimal(10)


def test_cli_costs_by_lane_json_and_plot(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from core.settings import get_settings
    from sheepdog.cli import build_app

    one_of_each(fresh_db)
    monkeypatch.setenv("SHEEPDOG_DATABASE_URL", fresh_db)
    monkeypatch.setenv("COLUMNS", "200")  # the table on one line a row
    get_settings.cache_clear()
    try:
        plot = tmp_path / "lanes.png"
        result = CliRunner().invoke(
            build_app(), ["costs", "--by", "lane", "--json", "--plot", str(plot)]
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["lanes"]["flex"] == {"requests": 2, "cost_usd": "10"}
        assert report["counterfactual"] == {
            "paid_usd": "42.5",
            "all_standard_usd": "50",
            "all_priority_usd": "87.5",
            "saved_usd": "7.5",
        }
        assert plot.read_bytes().startswith(b"\x89PNG")
        table = CliRunner().invoke(build_app(), ["costs", "--by", "lane"])
        assert table.exit_code == 0 and "all priority" in table.output
    finally:
        get_settings.cache_clear()
