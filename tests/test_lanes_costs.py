"""Budgets reserve at the lane's rate; the ledger bills the tier that served each call."""

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
    assert worst_case(flex, prices) * 2 == worst_case(stream, prices)
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
