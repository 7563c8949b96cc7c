"""The cost report: what the ledger says was spent, what the same traffic would have cost at the
standard (streaming) rate, the savings, and each budgeted tenant's use. SQL aggregates, Decimal."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from core.settings import Settings
from costs.budget_limits import (
    BudgetLimits,
    effective_limits,
    everyone_budgeted,
    list_budgets,
    period_starts,
    spend,
)
from costs.lanes_report import LANE_OF_TIER, LaneSummary, lane_summary
from costs.reservations import HELD
from models.tables import CostEntry, Reservation, utcnow

GroupBy = Literal["model", "tenant", "route", "lane", "day"]
GROUPS: tuple[GroupBy, ...] = ("model", "tenant", "route", "lane", "day")
SCALE = Decimal("1e-10")  # the ledger columns' scale; SQLite sums them as floats


def _usd(value: object) -> Decimal:
    return Decimal(0) if value is None else Decimal(str(value)).quantize(SCALE)


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


@dataclass(frozen=True)
class Line:
    """One group of the report (or the totals)."""

    key: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    standard_cost_usd: Decimal = Decimal(0)
    estimated: int = 0  # requests costed from a local token count

    @property
    def savings_usd(self) -> Decimal:
        return self.standard_cost_usd - self.cost_usd

    @property
    def savings_pct(self) -> Decimal:
        if not self.standard_cost_usd:
            return Decimal(0)
        return (self.savings_usd * 100 / self.standard_cost_usd).quantize(Decimal("0.1"))

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": _plain(self.cost_usd),
            "standard_cost_usd": _plain(self.standard_cost_usd),
            "savings_usd": _plain(self.savings_usd),
            "savings_pct": float(self.savings_pct),
            "estimated": self.estimated,
        }


@dataclass(frozen=True)
class PeriodUse:
    """One budget period of one tenant."""

    limit_usd: Decimal
    spent_usd: Decimal
    held_usd: Decimal

    @property
    def left_usd(self) -> Decimal:
        return self.limit_usd - self.spent_usd - self.held_usd

    def to_json(self) -> dict[str, str]:
        return {
            "limit_usd": _plain(self.limit_usd),
            "spent_usd": _plain(self.spent_usd),
            "held_usd": _plain(self.held_usd),
            "left_usd": _plain(self.left_usd),
        }


@dataclass(frozen=True)
class BudgetUse:
    tenant: str
    allow_downgrade: bool
    daily: PeriodUse | None
    monthly: PeriodUse | None

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "allow_downgrade": self.allow_downgrade,
            "daily": self.daily.to_json() if self.daily else None,
            "monthly": self.monthly.to_json() if self.monthly else None,
        }


@dataclass(frozen=True)
class CostReport:
    since: datetime | None
    by: GroupBy
    lines: list[Line]
    total: Line
    budgets: list[BudgetUse] = field(default_factory=list)
    lanes: LaneSummary = field(default_factory=LaneSummary)

    def to_json(self) -> dict[str, Any]:
        """One JSON-ready object; USD amounts are exact decimal strings."""
        return {
            "since": self.since.isoformat() if self.since else None,
            "by": self.by,
            "rows": [line.to_json() for line in self.lines],
            "totals": self.total.to_json(),
            "budgets": [b.to_json() for b in self.budgets],
            **self.lanes.to_json(),
        }


def day_of(session: Session, column: Any) -> ColumnElement[str]:
    """The UTC calendar day of a timestamp column as 'YYYY-MM-DD', on either backend."""
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)  # SQLite stores UTC text


def _group_column(session: Session, by: GroupBy) -> Any:
    if by == "day":
        return day_of(session, CostEntry.created_at)
    if by == "lane":
        return _lane_column()
    return {"model": CostEntry.model, "tenant": CostEntry.tenant, "route": CostEntry.route}[by]


def _lane_column() -> Any:
    """The lane of a ledger entry, from the tier it was billed at."""
    return case(
        *((CostEntry.tier == tier, lane) for tier, lane in LANE_OF_TIER.items()),
        else_=CostEntry.tier,
    )


def cost_lines(session: Session, since: datetime | None, by: GroupBy) -> list[Line]:
    """The ledger since `since`, summed per group."""
    if by not in GROUPS:
        raise ValueError(f"unknown grouping {by!r}; use one of {', '.join(GROUPS)}")
    key = _group_column(session, by).label("key")
    stmt = select(
        key,
        func.count(),
        func.coalesce(func.sum(CostEntry.prompt_tokens), 0),
        func.coalesce(func.sum(CostEntry.completion_tokens), 0),
        func.sum(CostEntry.cost_usd),
        func.sum(CostEntry.standard_cost_usd),
        func.coalesce(func.sum(case((CostEntry.estimated, 1), else_=0)), 0),
    ).group_by(key)
    if since is not None:
        stmt = stmt.where(CostEntry.created_at >= since)
    lines = [
        Line(str(k), int(n), int(p), int(c), _usd(cost), _usd(std), int(est))
        for k, n, p, c, cost, std, est in session.execute(stmt).all()
    ]
    if by == "day":
        return sorted(lines, key=lambda line: line.key)
    return sorted(lines, key=lambda line: line.cost_usd, reverse=True)


def total_of(lines: list[Line]) -> Line:
    return Line(
        "total",
        sum(x.requests for x in lines),
        sum(x.prompt_tokens for x in lines),
        sum(x.completion_tokens for x in lines),
        sum((x.cost_usd for x in lines), Decimal(0)),
        sum((x.standard_cost_usd for x in lines), Decimal(0)),
        sum(x.estimated for x in lines),
    )


def budget_use(
    session: Session, settings: Settings, now: datetime | None = None
) -> list[BudgetUse]:
    """Each budgeted tenant's spent, held, limit and left, today and this month (UTC)."""
    rows = {row.tenant: row for row in list_budgets(session)}
    tenants = set(rows)
    if everyone_budgeted(settings):  # the default covers anyone who spent or holds anything
        _, month = period_starts(now)
        tenants |= set(
            session.scalars(
                select(CostEntry.tenant).where(CostEntry.created_at >= month).distinct()
            )
        )
        tenants |= set(
            session.scalars(select(Reservation.tenant).where(Reservation.state == HELD).distinct())
        )
    limits: list[BudgetLimits] = [
        effective_limits(rows.get(t), t, settings) for t in sorted(tenants)
    ]
    limits = [x for x in limits if x.any]
    spent = spend(session, [x.tenant for x in limits], now)
    out = []
    for x in limits:
        s = spent[x.tenant]
        out.append(
            BudgetUse(
                tenant=x.tenant,
                allow_downgrade=x.allow_downgrade,
                daily=PeriodUse(x.daily_usd, s.daily_usd, s.held_usd)
                if x.daily_usd is not None
                else None,
                monthly=PeriodUse(x.monthly_usd, s.monthly_usd, s.held_usd)
                if x.monthly_usd is not None
                else None,
            )
        )
    return out


def cost_report(
    session: Session, settings: Settings, since: datetime | None = None, by: GroupBy = "model"
) -> CostReport:
    """The whole report: lines per group, totals, and budget use."""
    lines = cost_lines(session, since, by)
    budgets = budget_use(session, settings, utcnow())
    return CostReport(since, by, lines, total_of(lines), budgets, lane_summary(session, since))


def daily_by_route(
    session: Session, since: datetime | None, *, by: Literal["route", "lane"] = "route"
) -> list[tuple[str, str, Line]]:
    """(day, route or lane, line) for the plot: cost and standard cost per UTC day and group."""
    day = day_of(session, CostEntry.created_at).label("day")
    group = (_lane_column() if by == "lane" else CostEntry.route).label("group")
    stmt = select(
        day,
        group,
        func.count(),
        func.sum(CostEntry.cost_usd),
        func.sum(CostEntry.standard_cost_usd),
    ).group_by(day, group)
    if since is not None:
        stmt = stmt.where(CostEntry.created_at >= since)
    out = [
        (str(d), str(route), Line(str(route), int(n), cost_usd=_usd(c), standard_cost_usd=_usd(s)))
        for d, route, n, c, s in session.execute(stmt).all()
    ]
    return sorted(out, key=lambda r: (r[0], r[1]))
