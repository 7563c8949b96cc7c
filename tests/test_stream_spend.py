"""A stream's calls after billed text keep to what its cost cap or budget hold has left
(streaming/call_limits.py): real Redis, PostgreSQL, a stream worker and the simulator, which
records the output limit each call asked for."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, update

from core import keys
from core.celery_app import celery_for
from core.db import session_scope
from costs.budget_limits import set_budget
from lifecycle.dispatch import send_stream
from lifecycle.record import record_requests
from models.stream_message import encode
from models.tables import CostEntry, Request, Reservation
from rules.caps import tokens_within
from rules.prices import price_table
from rules.tokens import count_message_tokens
from streaming.billing import Billed
from streaming.call_limits import CallBound, SpendLimit
from streaming.out_of_band import publish_error
from streaming.publisher import Mode, publish_now
from tests.fixtures.ends import assert_ended
from tests.fixtures.faults import wait_final
from tests.fixtures.streaming import StreamDeployment

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def deployment(stack: Any, stream_deployment: StreamDeployment) -> Iterator[StreamDeployment]:
    proc = stack.start_worker(
        queues="stream,default", concurrency=20, env=stream_deployment.env, name="stream-spend"
    )
    yield stream_deployment
    proc.stop()


def request(tag: str, **extra: Any) -> dict[str, Any]:
    text = f"{tag} {uuid.uuid4().hex}"
    return {
        "model": "sheepdog-mini",
        "messages": [{"role": "user", "content": text}],
        "priority": "high",
        **extra,
    }


def ended(deployment: StreamDeployment, rid: str) -> Request:
    return wait_final(deployment.settings, [rid], 60)[rid]


def limits_asked(simulator: Any) -> list[Any]:
    """The output limit each chat call asked for since the simulator's reset."""
    return [r["max_tokens"] for r in simulator.stats()["chat_requests"]]


def charged(deployment: StreamDeployment, rid: str) -> CostEntry:
    with session_scope(deployment.settings.database_url) as session:
        entry = session.get(CostEntry, rid)
        assert entry is not None, rid
        return entry


@pytest.mark.unit
def test_tokens_within_a_sum() -> None:
    price = price_table().get("sheepdog-mini")  # $0.10 in, $0.40 out per 1M tokens
    assert tokens_within(price, 10, Decimal("0.000009"), "stream") == 20
    assert tokens_within(price, 10, Decimal("0.000001"), "stream") == 0
    assert tokens_within(price, 10, Decimal(1), "stream") == price.max_output_tokens


@pytest.mark.unit
def test_a_bound_fits_each_call_to_what_its_limit_leaves() -> None:
    asked: list[Decimal] = []
    limit = SpendLimit(Decimal("0.000009"), "max_cost_usd")

    async def read(needed: Decimal) -> SpendLimit | None:
        asked.append(needed)
        return limit

    bound = CallBound()

    def fit(billed: Billed, body: dict[str, Any]) -> str | None:
        return asyncio.run(bound.fit(read, billed, lambda: 10, body, "stream"))

    body = {"model": "sheepdog-mini", "max_tokens": 20}
    assert fit(Billed(), body) is None and bound.limit is None and not asked  # nothing billed
    # One call of a 10-token prompt streamed 8 pieces ($0.0000042): 9 tokens are left.
    assert fit(Billed(1, 8), body) is None and bound.limit == 9
    assert bound.body(body)["max_tokens"] == 9
    assert asked == [Decimal("0.0000042") + Decimal("0.000009")]  # billed + the call's worst
    assert "not retried: 2 earlier call(s)" in (fit(Billed(2, 16), body) or "")
    limit = SpendLimit(Decimal(1), "budget hold")  # roomy: the caller's own limit, or none
    assert fit(Billed(1, 8), body) is None and bound.limit == 20
    assert fit(Billed(1, 8), {"model": "sheepdog-mini"}) is None and bound.limit is None
    assert fit(Billed(1, 8), {"model": "not-priced", "max_tokens": 5}) is None
    assert bound.limit is None


def test_a_capped_stream_cut_again_and_again_stays_within_its_cap(
    deployment: StreamDeployment, simulator: Any
) -> None:
    """Each call streams 7 pieces and is cut. The cap fits a 14-token prompt and 19 output
    tokens: the retry asks for what is left (8 or 9), and the third call is not sent, as too
    little is left for its prompt and a token (it was four full calls, ~1.9x the cap)."""
    client = deployment.client()
    simulator.reset()
    body = request("spend-cap", max_cost_usd="0.000009")
    assert count_message_tokens(body["messages"]) == 14
    simulator.set_faults([{"match": body["messages"][0]["content"], "cut_after": 7}])
    rid = client.submit(body)
    row = assert_ended(ended(deployment, rid), "failed")
    assert "not retried: 2 earlier call(s)" in (row.error or ""), row.error
    assert "max_cost_usd of $0.000009" in (row.error or ""), row.error
    asked = limits_asked(simulator)
    assert asked[0] == row.body["max_tokens"] == 19 and asked[1:] in ([8], [9]), asked
    entry = charged(deployment, rid)
    assert entry.estimated and entry.prompt_tokens == 2 * 14, entry.prompt_tokens
    assert entry.cost_usd <= Decimal("0.000009"), entry.cost_usd


def budgeted(deployment: StreamDeployment, daily: str) -> str:
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    with session_scope(deployment.settings.database_url) as session:
        set_budget(session, tenant, daily_usd=Decimal(daily))
    return tenant


def hold_of(deployment: StreamDeployment, rid: str) -> Reservation:
    with session_scope(deployment.settings.database_url) as session:
        hold = session.get(Reservation, rid)
        assert hold is not None
        session.expunge(hold)
        return hold


def test_a_retry_grows_its_budget_hold_when_the_budget_has_room(
    deployment: StreamDeployment, simulator: Any
) -> None:
    """A hold is a reservation, not a limit the caller asked for: the retry after 5 billed
    pieces asks for the caller's max_tokens again, and the hold grows to cover it."""
    client = deployment.client()
    simulator.reset()
    body = request("spend-hold", max_tokens=40, metadata={"tenant": budgeted(deployment, "10")})
    simulator.set_faults([{"match": body["messages"][0]["content"], "cut_after": 5, "first": 1}])
    rid = client.submit(body)
    row = assert_ended(ended(deployment, rid))
    assert limits_asked(simulator) == [40, 40]
    hold = hold_of(deployment, rid)
    first = price_table().cost("sheepdog-mini", 14, 40, "stream")
    assert hold.state == "settled" and hold.amount_usd > first, (hold.amount_usd, first)
    assert hold.settled_usd == row.cost_usd <= hold.amount_usd


def test_a_retry_is_bounded_by_what_the_budget_has_left(
    deployment: StreamDeployment, simulator: Any
) -> None:
    """The budget ($0.00002) has room for the first call's hold ($0.0000174) and a little:
    the hold grows to the budget, and the retry asks for what it leaves (38 or 39 tokens)."""
    client = deployment.client()
    simulator.reset()
    tenant = budgeted(deployment, "0.00002")
    body = request("spend-tight", max_tokens=40, metadata={"tenant": tenant})
    simulator.set_faults([{"match": body["messages"][0]["content"], "cut_after": 5, "first": 1}])
    rid = client.submit(body)
    row = assert_ended(ended(deployment, rid))
    asked = limits_asked(simulator)
    assert asked[0] == 40 and asked[1:] in ([38], [39]), asked
    hold = hold_of(deployment, rid)
    assert hold.amount_usd == Decimal("0.00002") and row.cost_usd <= hold.amount_usd


def test_without_a_cap_or_hold_a_retry_keeps_the_callers_max_tokens(
    deployment: StreamDeployment, simulator: Any
) -> None:
    client = deployment.client()
    simulator.reset()
    body = request("spend-none", max_tokens=30)
    simulator.set_faults([{"match": body["messages"][0]["content"], "cut_after": 5, "first": 1}])
    rid = client.submit(body)
    assert_ended(ended(deployment, rid))
    assert limits_asked(simulator) == [30, 30]


def test_a_stream_taken_over_asks_for_what_the_earlier_worker_left(
    deployment: StreamDeployment, simulator: Any
) -> None:
    """The janitor took a capped stream back after its worker sent 6 pieces (its log holds
    them and the janitor's reset): the re-sent task's first call is fitted to the cap."""
    settings = deployment.settings
    client = deployment.client()
    item = client.prepare(request("spend-takeover", max_cost_usd="0.000009"))
    rid, first = item.id, int(item.body["max_tokens"])
    with session_scope(settings.database_url) as session:
        record_requests(session, [item])
        session.execute(update(Request).where(Request.id == rid).values(attempts=1))
    names = keys.of(settings)
    for seq in range(6):  # the dead worker's text, then the janitor's reset that fenced it
        payload = encode(rid, seq, "token", text=f"w{seq}")
        publish_now(deployment.redis, names, rid, payload, 120, 0, Mode.WORKER)
    publish_error(settings, rid, "", type_="reset", attempts=1)
    simulator.reset()
    send_stream(celery_for(settings), rid, why="test takeover", resent=True)
    row = assert_ended(ended(deployment, rid))
    prompt = count_message_tokens(item.body["messages"])
    price = price_table().get("sheepdog-mini")
    spent = price.cost(prompt, 6, "stream")
    assert limits_asked(simulator) == [
        min(first, tokens_within(price, prompt, Decimal("0.000009") - spent, "stream"))
    ]
    assert row.completion_tokens is not None
    with session_scope(settings.database_url) as session:
        entry = session.scalar(select(CostEntry).where(CostEntry.request_id == rid))
    assert entry is not None and entry.completion_tokens == row.completion_tokens + 6
