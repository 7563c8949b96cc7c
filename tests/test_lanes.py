"""The four lanes end to end: real workers, PostgreSQL, Redis and the simulator's service tiers.

Flex served at the batch rate, a flex 429 storm that ends on the standard lane before the
deadline, priority at its rate, and the ledger billed at the tier the response names."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from core.db import session_scope
from models.tables import CostEntry, Request
from rules.prices import price_table
from tests.fixtures.ends import assert_ended
from tests.fixtures.workers import Proc, Stack

MODEL = "gpt-4.1"
LANE_ENV = {
    "SHEEPDOG_OPENAI_SERVICE_TIERS": "flex,priority",
    "SHEEPDOG_BATCH_WINDOW_S": "3600",  # a deadline under an hour cannot wait for a batch
    "SHEEPDOG_FLEX_MIN_LEAD_S": "15",
    "SHEEPDOG_FLEX_FALLBACK_LEAD_S": "8",
    "SHEEPDOG_STREAM_BACKOFF_BASE_S": "0.2",
    "SHEEPDOG_STREAM_BACKOFF_MAX_S": "1",
}


@pytest.fixture(scope="module")
def lane_worker(stack: Stack) -> Proc:
    stack.env.update(LANE_ENV)  # the producer (stack_client) reads the same
    return stack.start_worker(concurrency=50, name="lanes")


@pytest.fixture
def client(lane_worker: Proc, stack_client: Any) -> Iterator[Any]:
    yield stack_client


def low(seconds: float, text: str = "flex please") -> dict[str, Any]:
    deadline = datetime.now(UTC) + timedelta(seconds=seconds)
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "priority": "low",
        "deadline": deadline.isoformat(),
        "max_tokens": 40,
    }


def ledger_row(db_url: str, request_id: str) -> CostEntry:
    with session_scope(db_url) as session:
        entry = session.get(CostEntry, request_id)
        assert entry is not None
        session.expunge(entry)
        return entry


def row(db_url: str, request_id: str) -> Request:
    with session_scope(db_url) as session:
        found = session.scalars(select(Request).where(Request.id == request_id)).one()
        session.expunge(found)
        return found


def at(tier: str, entry: CostEntry) -> Decimal:
    return price_table().cost(MODEL, entry.prompt_tokens, entry.completion_tokens, tier)  # type: ignore[arg-type]


def test_an_hour_away_takes_flex_and_pays_the_batch_rate(client: Any, stack: Stack) -> None:
    rid = client.submit(low(3000))
    view = assert_ended(client.result(rid, wait=60))
    assert view.lane == "flex" and view.route == "stream"
    assert view.lane_reason.startswith("low: flex at the batch rate")
    entry = ledger_row(stack.env["SHEEPDOG_DATABASE_URL"], rid)
    assert entry.tier == "flex" and entry.route == "stream"
    assert entry.cost_usd == at("batch", entry) and entry.standard_cost_usd == at("standard", entry)
    assert entry.cost_usd * 2 == entry.standard_cost_usd


def test_a_flex_429_storm_ends_on_the_standard_lane_before_the_deadline(
    client: Any, stack: Stack, simulator: Any
) -> None:
    simulator.configure(flex_capacity=0)  # every flex call: 429 resource unavailable
    before = simulator.stats()["counters"].get("errors.429", 0)
    request = low(25, "storm")
    deadline = datetime.fromisoformat(request["deadline"])
    rid = client.submit(request)
    view = assert_ended(client.result(rid, wait=60))
    assert view.finished_at < deadline  # never silently missed
    assert view.lane == "stream"
    assert "moved to stream: flex refused" in view.lane_reason
    refused = simulator.stats()["counters"].get("errors.429", 0) - before
    assert refused >= 3  # retried with backoff while the deadline allowed
    entry = ledger_row(stack.env["SHEEPDOG_DATABASE_URL"], rid)
    assert entry.tier == "standard" and entry.cost_usd == entry.standard_cost_usd


def test_high_asks_for_priority_and_pays_its_rate(client: Any, stack: Stack) -> None:
    rid = client.submit(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "urgent"}],
            "priority": "high",
            "lane": "priority",
            "max_tokens": 40,
        }
    )
    view = assert_ended(client.result(rid, wait=60))
    assert view.lane == "priority"
    entry = ledger_row(stack.env["SHEEPDOG_DATABASE_URL"], rid)
    assert entry.tier == "priority" and entry.cost_usd == at("priority", entry)
    assert view.cost_usd == entry.cost_usd


def test_the_bill_is_the_tier_the_response_names(client: Any, stack: Stack, simulator: Any) -> None:
    """Asked for flex, served standard (the provider did not offer it that time): billed at
    the standard rate, as the response says."""
    simulator.configure(service_tiers=[])
    rid = client.submit(low(3000, "no flex today"))
    view = assert_ended(client.result(rid, wait=60))
    assert view.lane == "flex"
    entry = ledger_row(stack.env["SHEEPDOG_DATABASE_URL"], rid)
    assert entry.tier == "standard" and entry.cost_usd == entry.standard_cost_usd
    assert row(stack.env["SHEEPDOG_DATABASE_URL"], rid).cost_usd == entry.cost_usd
