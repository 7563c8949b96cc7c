"""The cost ledger: each finished request's actual cost, written exactly once.

Both paths call `record()` in the same transaction that ends the request, so a retried ingest or
a re-delivered task cannot count a request twice (the ledger's request_id is unique and the
insert ignores duplicates). The same call settles the request's budget reservation to its actual
cost (costs.budgets), so "spent" moves from held to the ledger in one step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from costs.budgets import settle
from costs.prices import ModelPrice, PriceTable, Route, price_table
from models.tables import CostEntry, utcnow
from sheepdog.tokens import count_message_tokens, count_tokens


@dataclass(frozen=True)
class Usage:
    """What one finished request consumed, and on which path."""

    request_id: str
    tenant: str
    model: str
    route: Route
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False
    # The provider's own batch discount when it is not the price table's (an emulated batch
    # runs at the standard rate: 0). None: the price table's.
    batch_discount: Decimal | None = None


def estimated_usage(
    request_id: str,
    tenant: str,
    model: str,
    route: Route,
    messages: Sequence[dict[str, object]],
    text: str,
) -> Usage:
    """A Usage counted locally, for a request whose provider reported none (marked estimated)."""
    return Usage(
        request_id=request_id,
        tenant=tenant,
        model=model,
        route=route,
        prompt_tokens=count_message_tokens(messages),
        completion_tokens=count_tokens(text),
        estimated=True,
    )


def cost_of(usage: Usage, prices: PriceTable | None = None) -> tuple[Decimal, Decimal]:
    """(actual cost on the usage's route, what it would have cost at the standard rate)."""
    table = prices or price_table()
    price = with_discount(table.get(usage.model), usage.batch_discount)
    actual = price.cost(usage.prompt_tokens, usage.completion_tokens, usage.route)
    standard = price.cost(usage.prompt_tokens, usage.completion_tokens, "stream")
    return actual, standard


def with_discount(price: ModelPrice, batch_discount: Decimal | None) -> ModelPrice:
    """`price` with another batch discount (None: unchanged)."""
    if batch_discount is None or batch_discount == price.batch_discount:
        return price
    return price.model_copy(update={"batch_discount": batch_discount})


def record(session: Session, usages: Sequence[Usage], prices: PriceTable | None = None) -> int:
    """Write ledger rows for `usages` and settle their reservations; rows already written are
    left alone (a retried call counts nothing twice). Returns new rows."""
    if not usages:
        return 0
    now = utcnow()
    rows = []
    settled: list[tuple[str, Decimal]] = []
    for usage in usages:
        actual, standard = cost_of(usage, prices)
        settled.append((usage.request_id, actual))
        rows.append(
            {
                "request_id": usage.request_id,
                "tenant": usage.tenant,
                "model": usage.model,
                "route": usage.route,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "cost_usd": actual,
                "standard_cost_usd": standard,
                "estimated": usage.estimated,
                "created_at": now,
            }
        )
    dialect = session.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(CostEntry).on_conflict_do_nothing(index_elements=["request_id"])
    elif dialect == "sqlite":
        stmt = sqlite.insert(CostEntry).on_conflict_do_nothing(index_elements=["request_id"])
    else:
        stmt = insert(CostEntry)
    # RETURNING counts the rows really inserted (executemany rowcount is -1 on psycopg).
    inserted = len(session.connection().execute(stmt.returning(CostEntry.id), rows).all())
    settle(session, settled)  # touches only reservations still held: idempotent as well
    return inserted
