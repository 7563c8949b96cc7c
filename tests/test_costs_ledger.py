"""The ledger: exact costs on both paths, idempotent record(), estimates, the worked example."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import select

from core.db import session_scope
from core.settings import Settings
from costs.ledger import Usage, cost_of, estimated_usage, record
from costs.report import cost_lines
from models.tables import CostEntry
from rules.prices import price_table
from tests.fixtures.costs import insert_rows, make_item


def ledger_rows(url: str, ids: list[str]) -> dict[str, CostEntry]:
    with session_scope(url) as session:
        rows = session.scalars(select(CostEntry).where(CostEntry.request_id.in_(ids)))
        return {r.request_id: r for r in rows}


def test_exact_cents_on_both_paths(db_url: str, tenant: str) -> None:
    settings = Settings(database_url=db_url)
    stream, batch = make_item(settings, tenant), make_item(settings, tenant, priority="low")
    insert_rows(db_url, [stream, batch])
    # gpt-4.1: $2.00 in / $8.00 out per 1M tokens; batch at half.
    usages = [
        Usage(stream.id, tenant, "gpt-4.1", "stream", 1_234_567, 765_432),
        Usage(batch.id, tenant, "gpt-4.1", "batch", 1_234_567, 765_432),
    ]
    with session_scope(db_url) as session:
        assert record(session, usages) == 2
    rows = ledger_rows(db_url, [stream.id, batch.id])
    # 1.234567 * 2 + 0.765432 * 8 = 2.469134 + 6.123456 = 8.592590
    assert rows[stream.id].cost_usd == Decimal("8.59259")
    assert rows[stream.id].standard_cost_usd == Decimal("8.59259")
    assert rows[batch.id].cost_usd == Decimal("4.296295")
    assert rows[batch.id].standard_cost_usd == Decimal("8.59259")
    assert rows[batch.id].cost_usd.quantize(Decimal("0.01")) == Decimal("4.30")
    assert not rows[stream.id].estimated


def test_a_retried_record_does_not_double_count(db_url: str, tenant: str) -> None:
    settings = Settings(database_url=db_url)
    item = make_item(settings, tenant, model="sheepdog-mini", max_tokens=100)
    insert_rows(db_url, [item])
    usage = Usage(item.id, tenant, "sheepdog-mini", "stream", 1000, 1000)
    with session_scope(db_url) as session:
        assert record(session, [usage]) == 1
    for _ in range(2):  # a re-delivered task, a retried ingest
        with session_scope(db_url) as session:
            assert record(session, [usage, usage]) == 0
    with session_scope(db_url) as session:
        [line] = [x for x in cost_lines(session, None, "tenant") if x.key == tenant]
    assert line.requests == 1
    assert line.cost_usd == Decimal("0.0005")  # 1000 * 0.10/1M + 1000 * 0.40/1M


def test_unreported_usage_is_counted_locally_and_marked_estimated(db_url: str, tenant: str) -> None:
    settings = Settings(database_url=db_url)
    item = make_item(settings, tenant, model="sheepdog-mini", max_tokens=100)
    insert_rows(db_url, [item])
    usage = estimated_usage(
        item.id, tenant, "sheepdog-mini", "batch", item.body["messages"], "Hi, how are you?"
    )
    assert usage.estimated and usage.prompt_tokens > 0 and usage.completion_tokens == 6
    with session_scope(db_url) as session:
        record(session, [usage])
    row = ledger_rows(db_url, [item.id])[item.id]
    assert row.estimated and row.completion_tokens == 6
    with session_scope(db_url) as session:
        [line] = [x for x in cost_lines(session, None, "tenant") if x.key == tenant]
    assert line.estimated == 1


def test_worked_example_gpt41_ten_million_output_tokens_a_day_saves_40_dollars(
    pg_url: str, tenant: str
) -> None:
    """10M output tokens a day of gpt-4.1 moved from streaming to batch: $80 -> $40 a day."""
    price = price_table().get("gpt-4.1")
    assert price.cost(0, 10_000_000, "stream") == Decimal(80)
    assert price.cost(0, 10_000_000, "batch") == Decimal(40)
    # The same day's traffic through the ledger and the report, as 10 batch requests of 1M.
    settings = Settings(database_url=pg_url)
    items = [make_item(settings, tenant, priority="low") for _ in range(10)]
    insert_rows(pg_url, items)
    usages = [Usage(i.id, tenant, "gpt-4.1", "batch", 0, 1_000_000) for i in items]
    assert sum(cost_of(u)[0] for u in usages) == Decimal(40)
    with session_scope(pg_url) as session:
        record(session, usages)
        [line] = [x for x in cost_lines(session, None, "tenant") if x.key == tenant]
    assert line.completion_tokens == 10_000_000
    assert (line.cost_usd, line.standard_cost_usd) == (Decimal(40), Decimal(80))
    assert line.savings_usd == Decimal(40) and line.savings_pct == Decimal("50.0")
