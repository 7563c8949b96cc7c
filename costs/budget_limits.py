"""A tenant's budget: its limits (its row, else the settings default), what it has spent in
the current day and month, which tenants have one (cached for a few seconds), and the admin
commands that set and list them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import case, func, literal, or_, select, union_all
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from core.db import session_scope
from core.errors import DATABASE_HINT, InvalidRequest, ServiceUnavailable, redact_url
from core.settings import Settings
from costs.reservations import HELD
from models.intake_message import IntakeItem
from models.request import MAX_COST_USD_LIMIT, check_tenant, column_usd
from models.tables import Budget, CostEntry, Reservation, utcnow

log = logging.getLogger("sheepdog.budgets")


# -- limits and spending ---------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetLimits:
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


def effective_limits(row: Budget | None, tenant: str, settings: Settings) -> BudgetLimits:
    """The limits that apply to `tenant` (a null column falls back to the settings default)."""
    daily = row.daily_usd if row is not None else None
    monthly = row.monthly_usd if row is not None else None
    return BudgetLimits(
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
    """Each tenant's spending in the current day and month, plus its held reservations.

    One statement for both sums: a settle moves an amount from held to the ledger in one commit
    without the budget's lock, and two statements (each its own snapshot under PostgreSQL's
    READ COMMITTED) could miss it in both, letting a concurrent submit overspend."""
    names = sorted(set(tenants))
    if not names:
        return {}
    day, month = period_starts(now)
    zero = Decimal(0)
    out = {t: Spend(zero, zero, zero) for t in names}
    spent = select(
        CostEntry.tenant,
        literal(False).label("held"),
        func.sum(case((CostEntry.created_at >= day, CostEntry.cost_usd), else_=0)),
        func.sum(CostEntry.cost_usd),
    ).where(CostEntry.tenant.in_(names), CostEntry.created_at >= month)
    held = select(
        Reservation.tenant,
        literal(True).label("held"),
        func.sum(Reservation.amount_usd),
        literal(None),
    ).where(Reservation.tenant.in_(names), Reservation.state == HELD)
    rows: Sequence[Any] = session.execute(
        union_all(spent.group_by(CostEntry.tenant), held.group_by(Reservation.tenant))
    ).all()
    for tenant, is_held, first, second in rows:
        s = out[tenant]
        if is_held:
            out[tenant] = Spend(s.daily_usd, s.monthly_usd, _dec(first))
        else:
            out[tenant] = Spend(_dec(first), _dec(second), s.held_usd)
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


def needs_budget(items: Sequence[IntakeItem], settings: Settings) -> dict[str, list[int]]:
    """Indexes of the items whose tenant has a budget, by tenant (no I/O when cached)."""
    groups: dict[str, list[int]] = {}
    everyone = everyone_budgeted(settings)
    budgeted = frozenset() if everyone else budgeted_tenants(settings)
    for index, item in enumerate(items):
        tenant = tenant_of(item)
        if everyone or tenant in budgeted:
            groups.setdefault(tenant, []).append(index)
    return groups


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
    check_tenant(tenant)
    for value in (daily_usd, monthly_usd):
        if value is not None and value < 0:
            raise ValueError(f"a budget must not be negative, got {value}")
        if value is not None and column_usd(value) is None:  # what the column holds
            raise InvalidRequest(f"a budget must be below {MAX_COST_USD_LIMIT:,} USD, got {value}")
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
