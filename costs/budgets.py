"""Tenant budgets: reserve a request's worst case at submit, settle it to the actual cost when it
succeeds (costs.ledger.record), release it when it fails or is cancelled (sheepdog.lifecycle).

Spent in a period = the ledger's cost in that period + every reservation still held. A submit
that would take a tenant past its daily or monthly limit is refused (BudgetExceeded) or, when the
tenant allows it, a normal-priority request is downgraded to the batch path, where it costs half.

Atomicity: the reservations of one submit_many call are one transaction that first locks the
tenant's budget row (PostgreSQL `SELECT ... FOR UPDATE`) or takes SQLite's single writer lock
(`BEGIN IMMEDIATE`), so concurrent submits are serialised per tenant and can never overspend.
Tenants without a budget skip all of this: which tenants have one is cached for a few seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Any

from sqlalchemy import bindparam, case, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.orm import Session

from core.db import among, begin_write, session_scope
from core.errors import DATABASE_HINT, BudgetExceeded, ServiceUnavailable, redact_url
from core.settings import Settings
from models.intake_message import IntakeItem
from models.tables import Budget, CostEntry, Request, Reservation, utcnow
from rules.caps import effective_max_tokens
from rules.prices import PriceTable, Route, price_table
from rules.tokens import count_message_tokens

log = logging.getLogger("sheepdog.budgets")

HELD, SETTLED, RELEASED = "held", "settled", "released"
IN_CHUNK = 5000  # keep IN lists under driver limits


# -- limits and spending ---------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """A tenant's effective limits: its own row, falling back to the settings default."""

    tenant: str
    daily_usd: Decimal | None
    monthly_usd: Decimal | None
    allow_downgrade: bool

    @property
    def any(self) -> bool:
        return self.daily_usd is not None or self.monthly_usd is not None


@dataclass(frozen=True)
class Spend:
    """A tenant's ledger cost today and this month (UTC), and what its reservations hold."""

    daily_usd: Decimal
    monthly_usd: Decimal
    held_usd: Decimal


def effective_limits(row: Budget | None, tenant: str, settings: Settings) -> Limits:
    """The limits that apply to `tenant` (a null column falls back to the settings default)."""
    daily = row.daily_usd if row is not None else None
    monthly = row.monthly_usd if row is not None else None
    return Limits(
        tenant=tenant,
        daily_usd=daily if daily is not None else settings.default_daily_budget_usd,
        monthly_usd=monthly if monthly is not None else settings.default_monthly_budget_usd,
        allow_downgrade=bool(row is not None and row.allow_downgrade)
        or settings.default_budget_allow_downgrade,
    )


def period_starts(now: datetime | None = None) -> tuple[datetime, datetime]:
    """(start of today, start of this month), UTC."""
    now = (now or utcnow()).astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day, day.replace(day=1)


def spend(
    session: Session, tenants: Iterable[str], now: datetime | None = None
) -> dict[str, Spend]:
    """Each tenant's spending in the current day and month, plus its held reservations."""
    names = sorted(set(tenants))
    if not names:
        return {}
    day, month = period_starts(now)
    zero = Decimal(0)
    out = {t: Spend(zero, zero, zero) for t in names}
    ledger = session.execute(
        select(
            CostEntry.tenant,
            func.sum(case((CostEntry.created_at >= day, CostEntry.cost_usd), else_=0)),
            func.sum(CostEntry.cost_usd),
        )
        .where(CostEntry.tenant.in_(names), CostEntry.created_at >= month)
        .group_by(CostEntry.tenant)
    ).all()
    for tenant, daily, monthly in ledger:
        out[tenant] = Spend(_dec(daily), _dec(monthly), zero)
    held = session.execute(
        select(Reservation.tenant, func.sum(Reservation.amount_usd))
        .where(Reservation.tenant.in_(names), Reservation.state == HELD)
        .group_by(Reservation.tenant)
    ).all()
    for tenant, amount in held:
        s = out[tenant]
        out[tenant] = Spend(s.daily_usd, s.monthly_usd, _dec(amount))
    return out


def _dec(value: object) -> Decimal:
    # SQLite sums Numeric columns as floats; 10 places is the column's own scale.
    if value is None:
        return Decimal(0)
    return Decimal(str(value)).quantize(Decimal("1e-10"))


# -- which tenants have a budget (cached) ----------------------------------------------------

_budgeted: dict[str, tuple[float, frozenset[str]]] = {}


def everyone_budgeted(settings: Settings) -> bool:
    """A settings default budget applies to every tenant."""
    return (
        settings.default_daily_budget_usd is not None
        or settings.default_monthly_budget_usd is not None
    )


def budgeted_tenants(settings: Settings) -> frozenset[str]:
    """Tenants with a budget row that sets a limit, cached for budget_cache_ttl_s.

    A database that is not migrated has no budgets. When the database cannot be reached the
    last known set is kept; with none known yet the producer cannot tell and refuses."""
    url = settings.database_url
    now = time.monotonic()
    cached = _budgeted.get(url)
    if cached is not None and cached[0] > now:
        return cached[1]
    try:
        with session_scope(url) as session:
            tenants = frozenset(
                session.scalars(
                    select(Budget.tenant).where(
                        or_(Budget.daily_usd.is_not(None), Budget.monthly_usd.is_not(None))
                    )
                )
            )
    except (OperationalError, ProgrammingError) as err:
        if _missing_table(err):
            tenants = frozenset()
        elif cached is not None:
            log.warning("budgets: database unreachable, using the last known budgets")
            tenants = cached[1]
        else:
            raise ServiceUnavailable("the database", redact_url(url), DATABASE_HINT) from err
    _budgeted[url] = (now + settings.budget_cache_ttl_s, tenants)
    return tenants


def forget_budgets(settings: Settings | None = None) -> None:
    """Drop the cached budgeted-tenant set (after a budget changes in this process)."""
    if settings is None:
        _budgeted.clear()
    else:
        _budgeted.pop(settings.database_url, None)


def _missing_table(err: Exception) -> bool:
    text = str(getattr(err, "orig", err)).lower()
    return "no such table" in text or ("relation" in text and "does not exist" in text)


def tenant_of(item: IntakeItem) -> str:
    return str((item.request.get("metadata") or {}).get("tenant", "default"))


def _needs_budget(items: Sequence[IntakeItem], settings: Settings) -> dict[str, list[int]]:
    """Indexes of the items whose tenant has a budget, by tenant (no I/O when cached)."""
    groups: dict[str, list[int]] = {}
    everyone = everyone_budgeted(settings)
    budgeted = frozenset() if everyone else budgeted_tenants(settings)
    for index, item in enumerate(items):
        tenant = tenant_of(item)
        if everyone or tenant in budgeted:
            groups.setdefault(tenant, []).append(index)
    return groups


# -- reserve ---------------------------------------------------------------------------------


def worst_case(item: IntakeItem, prices: PriceTable, route: Route | None = None) -> Decimal:
    """The most `item` can cost: its prompt estimate plus max_tokens (the model's output limit
    when unset) at its route's rate."""
    price = prices.get(item.body["model"])
    prompt = count_message_tokens(item.body["messages"])
    out = item.body.get("max_tokens") or price.max_output_tokens
    return price.cost(prompt, int(out), route or item.route)


def reserve(
    items: list[IntakeItem], settings: Settings, prices: PriceTable | None = None
) -> list[IntakeItem]:
    """Hold each budgeted item's worst case against its tenant's budget, all or nothing.

    Returns the items, some possibly downgraded to the batch path; raises BudgetExceeded naming
    the tenant, the budget and what is left when a request does not fit."""
    groups = _needs_budget(items, settings)
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


def _left(limit: Decimal | None, used: Decimal) -> Decimal | None:
    return None if limit is None else limit - used


def _fit(
    item: IntakeItem,
    limits: Limits,
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


def _tightest(limits: Limits, spent: Spend, adding: Decimal) -> tuple[str, Decimal, Decimal] | None:
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
    worst = datetime.now(UTC) + timedelta(
        seconds=settings.batch_flush_interval_s + settings.batch_window_s
    )
    when = datetime.fromisoformat(deadline) if isinstance(deadline, str) else deadline
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return bool(when >= worst)


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
    return item.model_copy(update={"route": "batch", "body": body, "downgraded": True})


def money(value: Decimal, rounding: str = ROUND_HALF_EVEN) -> str:
    """USD for people: cents, or more digits for sub-cent amounts (-$1.50 when negative)."""
    sign = "-" if value < 0 else ""
    if value != 0 and abs(value) < Decimal("0.01"):
        return f"{sign}${abs(value.quantize(Decimal('0.000001'), rounding)).normalize():f}"
    return f"{sign}${abs(value.quantize(Decimal('0.01'), rounding)):,}"


def _refusal(
    item: IntakeItem,
    limits: Limits,
    tight: tuple[str, Decimal, Decimal],
    cost: Decimal,
    prices: PriceTable,
    batch: Decimal | None = None,
) -> str:
    period, limit, left = tight
    model = item.body["model"]
    out = item.body.get("max_tokens") or prices.get(model).max_output_tokens
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


# -- settle and release ----------------------------------------------------------------------


def settle(session: Session, actual: Sequence[tuple[str, Decimal]]) -> int:
    """Settle held reservations to their request's actual cost (ledger.record calls this)."""
    if not actual:
        return 0
    # Most traffic has no budget: find the few held reservations first (one indexed SELECT per
    # chunk) instead of an UPDATE per request, which dominated bulk ingests.
    ids = [rid for rid, _ in actual]
    held: set[str] = set()
    for start in range(0, len(ids), IN_CHUNK):
        chunk = ids[start : start + IN_CHUNK]
        held.update(
            session.scalars(
                select(Reservation.request_id).where(
                    among(session, Reservation.request_id, chunk), Reservation.state == HELD
                )
            )
        )
    actual = [(rid, cost) for rid, cost in actual if rid in held]
    if not actual:
        return 0
    stmt = (
        update(Reservation)
        .where(Reservation.request_id == bindparam("rid"), Reservation.state == HELD)
        .values(state=SETTLED, settled_usd=bindparam("cost"), settled_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    params = [{"rid": rid, "cost": cost} for rid, cost in actual]
    result = session.connection().execute(stmt, params)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def release(session: Session, request_ids: Sequence[str]) -> int:
    """Release the held reservations of `request_ids` (failed, cancelled or never sent)."""
    released = 0
    for start in range(0, len(request_ids), IN_CHUNK):
        chunk = list(request_ids[start : start + IN_CHUNK])
        stmt = (
            update(Reservation)
            .where(Reservation.request_id.in_(chunk), Reservation.state == HELD)
            .values(state=RELEASED, settled_usd=Decimal(0), settled_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        released += int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]
    return released


def release_items(items: Sequence[IntakeItem], settings: Settings) -> int:
    """Release what reserve() held for `items` (their send failed). No I/O when unbudgeted."""
    ids = [items[i].id for group in _needs_budget(items, settings).values() for i in group]
    if not ids:
        return 0
    try:
        with session_scope(settings.database_url) as session:
            return release(session, ids)
    except SQLAlchemyError:  # the send error is the one to report; release_stale() frees these
        log.warning("budgets: could not release %d reservations", len(ids), exc_info=True)
        return 0


def release_stale(session: Session, older_than: timedelta = timedelta(hours=1)) -> int:
    """Release reservations held longer than `older_than` whose request never reached a worker
    (the producer died between reserve and send) or has ended without settling them."""
    cutoff = utcnow() - older_than
    stale = (
        select(Reservation.request_id)
        .outerjoin(Request, Request.id == Reservation.request_id)
        .where(
            Reservation.state == HELD,
            Reservation.created_at < cutoff,
            or_(Request.id.is_(None), Request.status.in_(["succeeded", "failed", "cancelled"])),
        )
    )
    return release(session, list(session.scalars(stale)))


# -- admin -----------------------------------------------------------------------------------


def set_budget(
    session: Session,
    tenant: str,
    *,
    daily_usd: Decimal | None = None,
    monthly_usd: Decimal | None = None,
    allow_downgrade: bool | None = None,
    clear: Iterable[str] = (),
) -> Budget:
    """Create or update a tenant's budget; fields left None keep their value, `clear` names
    limits ("daily", "monthly") to remove."""
    for value in (daily_usd, monthly_usd):
        if value is not None and value < 0:
            raise ValueError(f"a budget must not be negative, got {value}")
    values: dict[str, Any] = {"updated_at": utcnow()}
    if daily_usd is not None or "daily" in clear:
        values["daily_usd"] = daily_usd
    if monthly_usd is not None or "monthly" in clear:
        values["monthly_usd"] = monthly_usd
    if allow_downgrade is not None:
        values["allow_downgrade"] = allow_downgrade
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(Budget).values({"tenant": tenant, "allow_downgrade": False, **values})
    session.execute(stmt.on_conflict_do_update(index_elements=["tenant"], set_=values))
    _budgeted.clear()
    return session.scalars(
        select(Budget).where(Budget.tenant == tenant).execution_options(populate_existing=True)
    ).one()


def list_budgets(session: Session) -> list[Budget]:
    """Every budget row, by tenant."""
    return list(session.scalars(select(Budget).order_by(Budget.tenant)))
