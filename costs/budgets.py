"""Tenant budgets at submit: reserve a request's worst case, or refuse or downgrade it. The
reservation is settled to the actual cost when the request succeeds and released when it fails
or is cancelled (costs/reservations.py); limits and spending are costs/budget_limits.py.

Spent in a period = the ledger's cost in that period + every reservation still held. A submit
that would take a tenant past its daily or monthly limit is refused (BudgetExceeded) or, when the
tenant allows it, a normal-priority request is downgraded to the batch path, where it costs
its provider's batch rate (half the table's by default; the standard rate on an emulated Batch
API, where a downgrade saves nothing).

Atomicity: the reservations of one submit_many call are one transaction that first locks the
tenant's budget row (PostgreSQL `SELECT ... FOR UPDATE`) or takes SQLite's single writer lock
(`BEGIN IMMEDIATE`), so concurrent submits are serialised per tenant and can never overspend.
Tenants without a budget skip all of this: which tenants have one is cached for a few seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from core.db import begin_write, session_scope
from core.errors import DATABASE_HINT, BudgetExceeded, ServiceUnavailable, redact_url
from core.settings import Settings
from costs.budget_limits import (
    BudgetLimits,
    Spend,
    effective_limits,
    needs_budget,
    spend,
)
from costs.reservations import HELD, release
from models.intake_message import IntakeItem, Route
from models.tables import Budget, Reservation, utcnow
from rules.caps import effective_max_tokens, output_limit, worst_call_cost
from rules.prices import PriceTable, price_table
from rules.routing import batch_horizon
from rules.tokens import count_message_tokens

log = logging.getLogger("sheepdog.budgets")


# -- reserve ---------------------------------------------------------------------------------


def worst_case(item: IntakeItem, prices: PriceTable, route: Route | None = None) -> Decimal:
    """The most `item` can cost: its prompt estimate plus max_tokens (the model's output limit
    when unset) at the rate of its lane (or `route`), as rules.prices.billed_lane bills it."""
    price = prices.get(item.body["model"])
    prompt = count_message_tokens(item.body["messages"])
    return worst_call_cost(price, prompt, item.body.get("max_tokens"), route or item.lane_or_route)


def reserve(
    items: list[IntakeItem], settings: Settings, prices: PriceTable | None = None
) -> list[IntakeItem]:
    """Hold each budgeted item's worst case against its tenant's budget, all or nothing.

    Returns the items, some possibly downgraded to the batch path; raises BudgetExceeded naming
    the tenant, the budget and what is left when a request does not fit."""
    groups = needs_budget(items, settings)
    if not groups:
        return items
    try:
        with session_scope(settings.database_url) as session:
            return _reserve_in(session, groups, items, prices or price_table(), settings)
    except OperationalError as err:
        url = redact_url(settings.database_url)
        raise ServiceUnavailable("the database", url, DATABASE_HINT) from err


def _reserve_in(
    session: Session,
    groups: dict[str, list[int]],
    items: list[IntakeItem],
    prices: PriceTable,
    settings: Settings,
) -> list[IntakeItem]:
    out = list(items)
    now = utcnow()
    rows: list[dict[str, Any]] = []
    begin_write(session)  # SQLite: the writer lock before reading what is spent, not at insert
    for tenant in sorted(groups):  # one lock order for every producer: no deadlocks
        limits = effective_limits(_lock_budget(session, tenant), tenant, settings)
        if not limits.any:
            continue
        spent = spend(session, [tenant], now)[tenant]
        adding = Decimal(0)
        for index in groups[tenant]:
            item, cost = _fit(out[index], limits, spent, adding, prices, settings)
            out[index] = item
            adding += cost
            rows.append(
                {
                    "request_id": item.id,
                    "tenant": tenant,
                    "amount_usd": cost,
                    "state": HELD,
                    "created_at": now,
                }
            )
    if rows:
        session.execute(insert(Reservation), rows)
    return out


def grow_hold(
    session: Session, settings: Settings, request_id: str, needed: Decimal
) -> Decimal | None:
    """Grow a request's held reservation toward `needed` (a stream's retry after billed text:
    what was billed plus the next call's worst case) as far as its tenant's budget has room,
    under the budget's lock as at submit; the hold after, or None when nothing is held. Call
    first thing in a fresh session."""
    begin_write(session)
    held = session.execute(
        select(Reservation.tenant, Reservation.amount_usd).where(
            Reservation.request_id == request_id, Reservation.state == HELD
        )
    ).one_or_none()
    if held is None:
        return None
    tenant, amount = held
    needed = needed.quantize(Decimal("1e-10"), ROUND_CEILING)  # the column's scale
    if needed <= amount:
        return amount
    limits = effective_limits(_lock_budget(session, tenant), tenant, settings)
    tight = _tightest(limits, spend(session, [tenant], utcnow())[tenant], Decimal(0))
    room = needed - amount if tight is None else min(needed - amount, max(tight[2], Decimal(0)))
    if room > 0:
        amount += room
        session.execute(
            update(Reservation)
            .where(Reservation.request_id == request_id, Reservation.state == HELD)
            .values(amount_usd=amount)
        )
    return amount


def _lock_budget(session: Session, tenant: str) -> Budget | None:
    """The tenant's budget row, locked until the transaction ends (created when missing, so a
    tenant under the settings default has a row to lock too)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            postgresql.insert(Budget)
            .values(tenant=tenant, allow_downgrade=False, updated_at=utcnow())
            .on_conflict_do_nothing(index_elements=["tenant"])
        )
        stmt = select(Budget).where(Budget.tenant == tenant).with_for_update()
        return session.scalars(stmt.execution_options(populate_existing=True)).one()
    return session.get(Budget, tenant, populate_existing=True)


def _fit(
    item: IntakeItem,
    limits: BudgetLimits,
    spent: Spend,
    adding: Decimal,
    prices: PriceTable,
    settings: Settings,
) -> tuple[IntakeItem, Decimal]:
    """The item (maybe downgraded) and its reservation, or BudgetExceeded."""
    cost = worst_case(item, prices)
    tight = _tightest(limits, spent, adding)
    if tight is None or cost <= tight[2]:
        return item, cost
    if limits.allow_downgrade and _can_downgrade(item, settings):
        # A cost cap buys more tokens at the batch rate, so its worst case stays at the cap;
        # when that does not fit, the same max_tokens at half price may.
        options = [downgrade(item, prices), downgrade(item, prices, rederive=False)]
        cheapest = Decimal(0)
        for cheaper in options:
            cheapest = worst_case(cheaper, prices)
            if cheapest <= tight[2]:
                log.info("budgets: %s of tenant %s downgraded to batch", item.id, limits.tenant)
                return cheaper, cheapest
        raise BudgetExceeded(_refusal(item, limits, tight, cost, prices, batch=cheapest))
    raise BudgetExceeded(_refusal(item, limits, tight, cost, prices))


def _tightest(
    limits: BudgetLimits, spent: Spend, adding: Decimal
) -> tuple[str, Decimal, Decimal] | None:
    """(period, limit, left) of the budget with the least left, or None when unlimited."""
    options = []
    for period, limit, used in (
        ("daily", limits.daily_usd, spent.daily_usd),
        ("monthly", limits.monthly_usd, spent.monthly_usd),
    ):
        if limit is not None:
            options.append((period, limit, limit - used - spent.held_usd - adding))
    return min(options, key=lambda o: o[2]) if options else None


def _can_downgrade(item: IntakeItem, settings: Settings) -> bool:
    """Only normal-priority streaming requests whose deadline the batch window can still meet."""
    if item.route != "stream" or item.escalated or item.request.get("priority") != "normal":
        return False
    deadline = item.request.get("deadline")
    if deadline is None:
        return True
    when = datetime.fromisoformat(deadline) if isinstance(deadline, str) else deadline
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return bool(when >= batch_horizon(settings))


def downgrade(item: IntakeItem, prices: PriceTable, rederive: bool = True) -> IntakeItem:
    """The item sent on the batch path instead; with `rederive`, a cost cap's max_tokens is
    derived again at the batch rate (the same cap buys more tokens)."""
    body = dict(item.body)
    cap = item.request.get("max_cost_usd")
    if cap is not None and rederive:
        price = prices.get(body["model"])
        tokens = effective_max_tokens(
            price,
            body["model"],
            count_message_tokens(body["messages"]),
            item.request.get("max_tokens"),
            Decimal(str(cap)),
            "batch",
        )
        if tokens is not None:
            body["max_tokens"] = tokens
    update = {
        "route": "batch",
        "lane": "batch",
        "lane_reason": "normal: batch, downgraded by the tenant's budget",
        "body": body,
        "downgraded": True,
    }
    return item.model_copy(update=update)


def money(value: Decimal, rounding: str = ROUND_HALF_EVEN) -> str:
    """USD for people: cents, or more digits for sub-cent amounts (-$1.50 when negative)."""
    sign = "-" if value < 0 else ""
    if value != 0 and abs(value) < Decimal("0.01"):
        return f"{sign}${abs(value.quantize(Decimal('0.000001'), rounding)).normalize():f}"
    return f"{sign}${abs(value.quantize(Decimal('0.01'), rounding)):,}"


def _refusal(
    item: IntakeItem,
    limits: BudgetLimits,
    tight: tuple[str, Decimal, Decimal],
    cost: Decimal,
    prices: PriceTable,
    batch: Decimal | None = None,
) -> str:
    period, limit, left = tight
    model = item.body["model"]
    out = output_limit(prices.get(model), item.body.get("max_tokens"))
    # What is left rounds down and what a request may cost rounds up, so the numbers shown
    # always agree with the refusal.
    text = (
        f"budget exceeded: tenant {limits.tenant!r} has"
        f" {money(max(left, Decimal(0)), ROUND_FLOOR)} left of its {period} budget of"
        f" {money(limit)}; this request may cost up to {money(cost, ROUND_CEILING)}"
        f" ({model} via {item.route}, max_tokens {out})"
    )
    if batch is not None:
        return text + f", and up to {money(batch, ROUND_CEILING)} even downgraded to batch"
    hint = " or lower max_tokens / max_cost_usd"
    if item.route == "stream" and item.request.get("priority") == "normal":
        hint = (
            f", lower max_tokens, or allow downgrades to batch: sheepdog costs budget set"
            f" {limits.tenant} --allow-downgrade"
        )
    return text + f"; raise the budget{hint}"


def release_items(items: Sequence[IntakeItem], settings: Settings) -> int:
    """Release what reserve() held for `items` (their send failed). No I/O when unbudgeted."""
    ids = [items[i].id for group in needs_budget(items, settings).values() for i in group]
    if not ids:
        return 0
    try:
        with session_scope(settings.database_url) as session:
            return release(session, ids)
    except SQLAlchemyError:  # the send error is the one to report; release_stale() frees these
        log.warning("budgets: could not release %d reservations", len(ids), exc_info=True)
        return 0
