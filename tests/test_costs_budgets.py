"""Budgets: reservations at submit, refusal and downgrade, settle on record, release on
failure or cancel, concurrency, and the no-budget fast path."""

from __future__ import annotations

import math
import threading
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import pytest
import redis

from core.db import session_scope
from core.errors import BudgetExceeded, ServiceUnavailable
from core.settings import Settings
from costs import budget_limits, budgets
from costs.budget_limits import budgeted_tenants
from costs.budgets import reserve, worst_case
from costs.ledger import Usage, record
from costs.reservations import release_stale
from lifecycle.moves import move, move_many
from lifecycle.record import row_values
from models.intake_message import IntakeItem
from models.status import Status
from rules.prices import price_table
from sheepdog.client import Client
from tests.fixtures.costs import budget, insert_rows, make_item, reservations
from tests.fixtures.services import redis_db

BROKER_DB = redis_db(4)  # no worker listens here: sent tasks stay put; flushed


@pytest.mark.unit
def test_a_worst_case_is_prompt_plus_max_tokens_at_the_route_rate(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/x.db")
    prices = price_table()
    item = make_item(settings, "t", max_tokens=10_000)
    prompt = item.body["messages"]
    from rules.tokens import count_message_tokens

    expected = (Decimal(2) * count_message_tokens(prompt) + Decimal(8) * 10_000) / 1_000_000
    assert worst_case(item, prices) == expected
    assert worst_case(item, prices, "batch") == expected / 2
    unset = make_item(settings, "t", max_tokens=None)  # the model's own output limit: 32768
    assert worst_case(unset, prices) > Decimal(8) * 32_768 / 1_000_000


def test_reserve_within_budget_then_refuse_naming_tenant_budget_and_left(
    db_url: str, tenant: str
) -> None:
    settings = Settings(database_url=db_url)
    budget(db_url, tenant, daily_usd="0.25")
    first = make_item(settings, tenant, max_tokens=20_000)  # ~$0.16 at most
    [kept] = reserve([first], settings)
    assert kept.route == "stream" and not kept.downgraded
    held = reservations(db_url, [first.id])[first.id]
    assert held.state == "held" and held.amount_usd == worst_case(first, price_table())

    second = make_item(settings, tenant, max_tokens=20_000)
    with pytest.raises(BudgetExceeded) as err:
        reserve([second], settings)
    message = str(err.value)
    left = (Decimal("0.25") - held.amount_usd).quantize(Decimal("0.01"), ROUND_FLOOR)
    assert f"tenant {tenant!r}" in message
    assert "daily budget of $0.25" in message
    assert f"${left} left" in message
    assert "--allow-downgrade" in message
    assert second.id not in reservations(db_url, [second.id])  # all or nothing


def test_a_prompt_without_spaces_is_held_at_its_length(db_url: str, tenant: str) -> None:
    """A Chinese prompt of 20,000 characters is ~20,000 tokens; the local count took any run of
    word characters for one token, so its hold was priced as if the prompt were empty and a
    budget of a cent let it through (and a base64 blob likewise)."""
    settings = Settings(database_url=db_url)
    budget(db_url, tenant, daily_usd="0.01")
    for prompt in ("中文" * 10_000, "QUJD" * 25_000):
        item = make_item(settings, tenant, max_tokens=10, prompt=prompt)
        assert worst_case(item, price_table()) > Decimal("0.01")
        with pytest.raises(BudgetExceeded):
            reserve([item], settings)
    assert len(reserve([make_item(settings, tenant, max_tokens=10)], settings)) == 1


def test_a_bulk_submit_is_all_or_nothing(db_url: str, tenant: str) -> None:
    settings = Settings(database_url=db_url)
    budget(db_url, tenant, monthly_usd="1")
    items = [make_item(settings, tenant, max_tokens=30_000) for _ in range(5)]  # ~$0.24 each
    with pytest.raises(BudgetExceeded, match=r"monthly budget of \$1\.00"):
        reserve(items, settings)
    assert reservations(db_url, [i.id for i in items]) == {}
    assert len(reserve(items[:4], settings)) == 4


def test_downgrade_moves_a_normal_request_to_batch_at_half_price(db_url: str, tenant: str) -> None:
    settings = Settings(database_url=db_url)
    budget(db_url, tenant, daily_usd="0.13", allow_downgrade=True)
    item = make_item(settings, tenant, max_tokens=10_000)  # ~$0.08 stream
    high = make_item(settings, tenant, max_tokens=10_000, priority="high")
    [a] = reserve([item], settings)
    assert a.route == "stream"  # fits as it is: no downgrade
    [b] = reserve([make_item(settings, tenant, max_tokens=8_000)], settings)
    assert (b.route, b.downgraded) == ("batch", True)  # $0.064 fits only at $0.032 (batch)
    assert reservations(db_url, [b.id])[b.id].amount_usd == worst_case(b, price_table())
    assert row_values(b)["metadata_"]["sheepdog.downgraded"] == "budget"
    assert row_values(b)["route"] == "batch" and row_values(b)["priority"] == "normal"
    with pytest.raises(BudgetExceeded) as err:  # high priority is never downgraded
        reserve([high], settings)
    assert "$0.01 left of its daily budget of $0.13" in str(err.value)
    with pytest.raises(BudgetExceeded, match="even downgraded to batch"):
        reserve([make_item(settings, tenant, max_tokens=30_000)], settings)


def test_downgrade_with_a_cost_cap(db_url: str, tenant: str) -> None:
    settings = Settings(database_url=db_url)
    prices = price_table()
    item = make_item(settings, tenant, max_tokens=None, max_cost_usd="0.03")
    stream_tokens = item.body["max_tokens"]
    rederived = budgets.downgrade(item, prices)  # the same cap buys twice the tokens on batch
    assert rederived.body["max_tokens"] > stream_tokens * 1.9
    assert worst_case(rederived, prices) <= Decimal("0.03")
    # With $0.02 left the re-derived worst case ($0.03) cannot fit; the same tokens at half can.
    budget(db_url, tenant, daily_usd="0.02", allow_downgrade=True)
    [down] = reserve([item], settings)
    assert (down.route, down.body["max_tokens"]) == ("batch", stream_tokens)
    assert worst_case(down, prices) <= Decimal("0.015")


def test_record_settles_and_lifecycle_releases(db_url: str, tenant: str) -> None:
    settings = Settings(database_url=db_url)
    budget(db_url, tenant, daily_usd="10")
    items = [make_item(settings, tenant, max_tokens=1_000) for _ in range(5)]
    reserve(items, settings)
    insert_rows(db_url, items)
    ok, cancelled, failed_a, failed_b, streaming = (i.id for i in items)
    with session_scope(db_url) as session:
        move(session, ok, Status.STREAMING)
        move(session, streaming, Status.STREAMING)
        move(session, ok, Status.SUCCEEDED, text="hi", prompt_tokens=10, completion_tokens=20)
        record(session, [Usage(ok, tenant, "gpt-4.1", "stream", 10, 20)])
        assert move(session, cancelled, Status.CANCELLED)
        assert move_many(session, [failed_a, failed_b], Status.FAILED, error="boom") == 2
    rows = reservations(db_url, [i.id for i in items])
    assert rows[ok].state == "settled" and rows[ok].settled_usd == Decimal("0.00018")
    assert rows[cancelled].state == rows[failed_a].state == rows[failed_b].state == "released"
    assert rows[cancelled].settled_usd == 0
    assert rows[streaming].state == "held"
    with session_scope(db_url) as session:  # settling again changes nothing
        record(session, [Usage(ok, tenant, "gpt-4.1", "stream", 999, 999)])
        assert not move(session, ok, Status.FAILED)
    assert reservations(db_url, [ok])[ok].settled_usd == Decimal("0.00018")
    spend = _spend(db_url, tenant)
    assert spend.daily_usd == Decimal("0.00018")
    assert spend.held_usd == rows[streaming].amount_usd


def _spend(url: str, tenant: str) -> budget_limits.Spend:
    with session_scope(url) as session:
        return budget_limits.spend(session, [tenant])[tenant]


def test_a_settle_between_the_reads_of_a_spend_is_not_missed(pg_url: str, tenant: str) -> None:
    """A tenant's ledger and held sums were two statements: on PostgreSQL (READ COMMITTED, a
    snapshot a statement) a request settled between them was in neither, and a concurrent
    submit could pass the budget by that amount. The settle is made to land right after the
    spend's first statement."""
    settings = Settings(database_url=pg_url)
    budget(pg_url, tenant, daily_usd="10")
    item = make_item(settings, tenant, max_tokens=1_000)
    reserve([item], settings)
    insert_rows(pg_url, [item])
    held = reservations(pg_url, [item.id])[item.id].amount_usd
    with session_scope(pg_url) as session:
        move(session, item.id, Status.STREAMING)

    def settle_now() -> None:
        with session_scope(pg_url) as other:
            move(
                other, item.id, Status.SUCCEEDED, text="hi", prompt_tokens=10, completion_tokens=20
            )
            record(other, [Usage(item.id, tenant, "gpt-4.1", "stream", 10, 20)])

    with session_scope(pg_url) as session:
        execute, statements = session.execute, []

        def execute_then_settle(*args: object, **kwargs: object) -> object:
            result = execute(*args, **kwargs)  # type: ignore[arg-type]
            if not statements:
                settle_now()
            statements.append(args[0])
            return result

        session.execute = execute_then_settle  # type: ignore[method-assign]
        seen = budget_limits.spend(session, [tenant])[tenant]
    assert reservations(pg_url, [item.id])[item.id].state == "settled"
    assert (seen.daily_usd, seen.held_usd) in ((0, held), (Decimal("0.00018"), 0)), seen


def test_concurrent_submits_never_pass_the_budget(db_url: str, tenant: str) -> None:
    """20 producers at once, each reserving a worst case of ~1/5.5 of the budget: exactly 5 fit."""
    settings = Settings(database_url=db_url)
    items = [make_item(settings, tenant, max_tokens=10_000) for _ in range(20)]
    cost = worst_case(items[0], price_table())
    limit = (cost * Decimal("5.5")).quantize(Decimal("0.000001"))
    budget(db_url, tenant, daily_usd=limit)
    outcomes: list[str] = []
    barrier = threading.Barrier(len(items))

    def submit(item: IntakeItem) -> None:
        barrier.wait()
        try:
            reserve([item], settings)
            outcomes.append("ok")
        except BudgetExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit, args=(i,)) for i in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["ok"] * 5 + ["refused"] * 15
    spend = _spend(db_url, tenant)
    assert spend.held_usd == cost * 5 and spend.held_usd <= limit


def test_settings_default_budget_applies_to_every_tenant(db_url: str, tenant: str) -> None:
    settings = Settings(database_url=db_url, default_daily_budget_usd=Decimal("0.05"))
    [ok] = reserve([make_item(settings, tenant, max_tokens=1_000)], settings)
    with pytest.raises(BudgetExceeded, match=f"tenant '{tenant}' has .* daily budget of \\$0.05"):
        reserve([make_item(settings, tenant, max_tokens=10_000)], settings)
    assert reservations(db_url, [ok.id])[ok.id].state == "held"


def test_unbudgeted_tenants_never_touch_the_database(tmp_path: Path, tenant: str) -> None:
    down = Settings(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    items = [make_item(down, tenant) for _ in range(3)]
    budget_limits._budgeted[down.database_url] = (math.inf, frozenset({"someone-else"}))
    try:
        assert reserve(items, down) is items  # the cached set answers: no DB round trip
        budget_limits._budgeted[down.database_url] = (math.inf, frozenset({tenant}))
        with pytest.raises(ServiceUnavailable, match="cannot reach the database"):
            reserve(items, down)
    finally:
        budget_limits.forget_budgets(down)
    fresh = Settings(database_url=f"sqlite:///{tmp_path}/not-migrated.db")
    assert budgeted_tenants(fresh) == frozenset()  # no budgets table: nobody has a budget


def test_client_submit_reserves_refuses_and_releases_when_sending_fails(
    pg_url: str, tenant: str
) -> None:
    broker = redis.Redis.from_url(BROKER_DB)
    broker.flushdb()
    settings = Settings(database_url=pg_url, redis_url=BROKER_DB)
    budget(pg_url, tenant, daily_usd="0.20", allow_downgrade=True)
    client = Client(settings)
    request = {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 15_000,
        "metadata": {"tenant": tenant},
    }
    first, second = client.submit_many([request, request])  # $0.12 fits; $0.12 more does not
    held = reservations(pg_url, [first, second])
    assert held[first].amount_usd > held[second].amount_usd  # the second went batch, half price
    with pytest.raises(BudgetExceeded):
        client.submit({**request, "priority": "high"})
    broker.flushdb()

    dead = Client(Settings(database_url=pg_url, redis_url="redis://127.0.0.1:1/0"))
    budget(pg_url, tenant, daily_usd="100")
    before = set(reservations(pg_url, [first, second]))
    with pytest.raises(ServiceUnavailable, match="Redis"):
        dead.submit_many([request])
    with session_scope(pg_url) as session:
        from sqlalchemy import select

        from models.tables import Reservation

        states = session.scalars(
            select(Reservation.state).where(
                Reservation.tenant == tenant, Reservation.request_id.not_in(before)
            )
        ).all()
    assert states == ["released"]


def test_release_stale_frees_reservations_whose_request_never_arrived(
    db_url: str, tenant: str
) -> None:
    settings = Settings(database_url=db_url)
    budget(db_url, tenant, daily_usd="10")
    lost, alive = make_item(settings, tenant), make_item(settings, tenant)
    reserve([lost, alive], settings)
    insert_rows(db_url, [alive])
    from datetime import timedelta

    with session_scope(db_url) as session:
        assert release_stale(session, timedelta(hours=1)) == 0  # too young
        release_stale(session, timedelta(seconds=-1))
    rows = reservations(db_url, [lost.id, alive.id])
    assert rows[lost.id].state == "released" and rows[alive.id].state == "held"
