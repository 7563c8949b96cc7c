"""The four lanes end to end: real workers, PostgreSQL, Redis and the simulator's service tiers.

Flex served at the batch rate, a flex 429 storm that ends on the standard lane before the
deadline, priority at its rate, the ledger billed at the tier the response names, and an
expired batch's unfinished lines finishing through flex. The module has a database of its own:
its beat's flush claims every queued batch row it can see."""

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
from tests.fixtures.pg import throwaway_database
from tests.fixtures.workers import Proc, Stack

MODEL = "gpt-4.1"
LANE_ENV = {
    "SHEEPDOG_OPENAI_SERVICE_TIERS": "flex,priority",
    # A batch may take 30 s (after a 1 s flush): a deadline 15-31 s away takes flex.
    "SHEEPDOG_BATCH_WINDOW_S": "30",
    "SHEEPDOG_FLEX_MIN_LEAD_S": "15",
    "SHEEPDOG_FLEX_FALLBACK_LEAD_S": "8",
    "SHEEPDOG_STREAM_BACKOFF_BASE_S": "0.2",
    "SHEEPDOG_STREAM_BACKOFF_MAX_S": "1",
}


@pytest.fixture(scope="module")
def lanes_db() -> Iterator[str]:
    with throwaway_database("sheepdog_l") as url:
        yield url


@pytest.fixture(scope="module")
def lane_worker(stack: Stack, lanes_db: str) -> Proc:
    # The producer (stack_client) reads the same environment.
    stack.env.update(LANE_ENV, SHEEPDOG_DATABASE_URL=lanes_db)
    worker = stack.start_worker(concurrency=50, name="lanes")
    stack.start_beat(name="lanesbeat")
    return worker


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
    rid = client.submit(low(25))
    view = assert_ended(client.result(rid, wait=60))
    assert view.lane == "flex" and view.route == "stream"
    assert view.lane_reason.startswith("low: flex, deadline in")
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


def test_a_priority_stream_cancelled_mid_answer_pays_the_priority_rate(
    client: Any, stack: Stack, simulator: Any
) -> None:
    """A cut answer is billed at the tier its chunks named, priority here (it was billed at the
    standard rate, under half of priority's)."""
    import uuid

    tag = f"cut priority {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 200}])
    request = {"model": MODEL, "messages": [{"role": "user", "content": tag}], "priority": "high"}
    rid = client.submit({**request, "lane": "priority"})
    assert next(iter(client.stream(rid, timeout=30)))  # text is streaming
    assert client.cancel(rid)
    view = assert_ended(client.result(rid, wait=30), "cancelled")
    entry = ledger_row(stack.env["SHEEPDOG_DATABASE_URL"], rid)
    assert entry.estimated and entry.tier == "priority" and entry.cost_usd == at("priority", entry)
    assert view.cost_usd == entry.cost_usd


def test_the_bill_is_the_tier_the_response_names(client: Any, stack: Stack, simulator: Any) -> None:
    """Asked for flex, served standard (the provider did not offer it that time): billed at
    the standard rate, as the response says."""
    simulator.configure(service_tiers=[])
    rid = client.submit(low(25, "no flex today"))
    view = assert_ended(client.result(rid, wait=60))
    assert view.lane == "flex"
    entry = ledger_row(stack.env["SHEEPDOG_DATABASE_URL"], rid)
    assert entry.tier == "standard" and entry.cost_usd == entry.standard_cost_usd
    assert row(stack.env["SHEEPDOG_DATABASE_URL"], rid).cost_usd == entry.cost_usd


def test_a_cut_answer_is_billed_at_the_tier_its_chunks_named(
    client: Any, stack: Stack, simulator: Any
) -> None:
    """Asked for flex, served standard, cut on every attempt: billed at the standard rate the
    chunks named. A cut answer was billed at the tier its lane asked for, half the price."""
    import uuid

    tag = f"cut served standard {uuid.uuid4().hex}"
    simulator.configure(service_tiers=[])
    simulator.set_faults([{"match": tag, "cut_after": 3}])
    rid = client.submit(low(25, tag))
    view = assert_ended(client.result(rid, wait=60), "failed")
    assert view.lane == "flex"
    entry = ledger_row(stack.env["SHEEPDOG_DATABASE_URL"], rid)
    assert entry.estimated and entry.tier == "standard", (entry.tier, view.error)
    assert entry.cost_usd == entry.standard_cost_usd == view.cost_usd


def test_a_flex_answer_that_ends_past_its_deadline_is_logged(
    client: Any, lane_worker: Proc, simulator: Any
) -> None:
    """Started in time, it is not cut (the answer streams); it ends after its deadline, which
    the worker logs for the operator."""
    import uuid

    tag = f"slow flex {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "ttft_ms": 2000, "chunk_delay_ms": 250}])
    request = low(16, tag)
    rid = client.submit(request)
    view = assert_ended(client.result(rid, wait=60))
    assert view.lane == "flex" and view.finished_at > datetime.fromisoformat(request["deadline"])
    assert (
        f"{rid}: finished" in lane_worker.log_text()
        and "after its deadline" in lane_worker.log_text()
    )


def test_an_expired_batch_finishes_its_unfinished_lines_through_flex(
    client: Any, stack: Stack, simulator: Any
) -> None:
    """Submitted with time for a batch (38 s; a batch may take 31): the batch validates for
    10 s, then expires with every line unfinished. Another batch window would miss the
    deadline, so the lines go to flex, and end there before it."""
    simulator.configure(
        batch_validate_s=10_000,  # provider seconds: 10 s at the session's time scale
        faults=[{"batch": "expire", "after_lines": 0, "match": "salvage"}],
    )
    requests = [low(38, f"salvage me {n}") for n in range(3)]
    ids = client.submit_many(requests)
    views = [assert_ended(client.result(rid, wait=60)) for rid in ids]
    deadline = min(datetime.fromisoformat(r["deadline"]) for r in requests)
    db = stack.env["SHEEPDOG_DATABASE_URL"]
    for view in views:
        assert view.finished_at < deadline
        assert view.lane == "flex" and view.route == "stream"
        assert view.lane_reason.startswith("salvaged (the batch expired")
        assert row(db, view.id).batch_job_id is None
        assert ledger_row(db, view.id).tier == "flex"


def capped(seconds: float, text: str, tenant: str, cap: str = "0.00025") -> dict[str, Any]:
    """A low request with a cost cap, of a budgeted tenant: $0.00025 buys its 40 tokens at the
    batch rate, and about 28 at the standard rate."""
    return {**low(seconds, text), "max_cost_usd": cap, "metadata": {"tenant": tenant}}


def assert_within_cap_and_hold(db: str, rid: str, cap: str) -> CostEntry:
    from tests.fixtures.costs import reservations

    entry = ledger_row(db, rid)
    held = reservations(db, [rid])[rid]
    assert entry.cost_usd <= Decimal(cap), (entry.cost_usd, entry.tier, entry.completion_tokens)
    assert held.state == "settled" and held.settled_usd == entry.cost_usd
    assert entry.cost_usd <= held.amount_usd, (entry.cost_usd, held.amount_usd, entry.tier)
    return entry


def test_a_flex_fallback_bills_within_what_the_budget_held(
    client: Any, stack: Stack, simulator: Any, tenant: str
) -> None:
    """Flex may end on the standard lane: the budget holds the standard rate from the start,
    as the cap does (a flex hold at the batch rate was overrun 2x by the fallback)."""
    from tests.fixtures.costs import budget

    db = stack.env["SHEEPDOG_DATABASE_URL"]
    budget(db, tenant, daily_usd="1")
    simulator.configure(flex_capacity=0)
    rid = client.submit(capped(25, "storm, capped", tenant))
    view = assert_ended(client.result(rid, wait=60))
    assert view.lane == "stream" and "moved to stream: flex refused" in view.lane_reason
    entry = assert_within_cap_and_hold(db, rid, "0.00025")
    assert entry.tier == "standard"


def test_a_salvaged_line_is_capped_again_at_the_rate_of_its_new_lane(
    client: Any, stack: Stack, simulator: Any, tenant: str
) -> None:
    """Capped and held at the batch rate, then salvaged to a lane that may bill the standard
    rate (flex, which may fall back): its max_tokens is cut to what its cap and its hold buy
    there before it moves, and every answer ends within both."""
    from rules.caps import max_tokens_for_cap
    from rules.tokens import count_message_tokens
    from tests.fixtures.costs import budget, reservations

    db = stack.env["SHEEPDOG_DATABASE_URL"]
    budget(db, tenant, daily_usd="1")
    simulator.configure(
        batch_validate_s=10_000,
        faults=[{"batch": "expire", "after_lines": 0, "match": "salvage capped"}],
    )
    requests = [capped(38, f"salvage capped {n}", tenant) for n in range(3)]
    ids = client.submit_many(requests)
    assert {row(db, rid).body["max_tokens"] for rid in ids} == {40}  # the batch rate's
    views = [assert_ended(client.result(rid, wait=60)) for rid in ids]
    price = price_table().get(MODEL)
    held = reservations(db, ids)
    for view, request in zip(views, requests, strict=True):
        assert view.lane_reason.startswith("salvaged (the batch expired")
        prompt = count_message_tokens(request["messages"])
        # The hold (40 tokens at the batch rate) is the tighter limit here.
        expected = min(
            max_tokens_for_cap(price, MODEL, prompt, limit, "stream")
            for limit in (Decimal("0.00025"), held[view.id].amount_usd)
        )
        assert row(db, view.id).body["max_tokens"] == expected < 40
        assert_within_cap_and_hold(db, view.id, "0.00025")
