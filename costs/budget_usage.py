"""How much of each budget is used: the figure the budget alerts watch (workers/metrics.py)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.settings import Settings
from costs.budget_limits import effective_limits, everyone_budgeted, period_starts, spend
from models.tables import Budget, CostEntry


def used_ratios(session: Session, settings: Settings) -> list[tuple[str, str, float]]:
    """(tenant, "day" | "month", (spent + held) / limit) for each tenant a limit applies to:
    those with a budget row, and every tenant in this month's ledger when a settings default
    budget applies to everyone. Held reservations count, as the intake's check counts them."""
    rows = {b.tenant: b for b in session.scalars(select(Budget))}
    tenants = set(rows)
    if everyone_budgeted(settings):
        month = period_starts()[1]
        tenants |= set(
            session.scalars(
                select(CostEntry.tenant).where(CostEntry.created_at >= month).distinct()
            )
        )
    out: list[tuple[str, str, float]] = []
    for tenant, spent in sorted(spend(session, tenants).items()):
        limits = effective_limits(rows.get(tenant), tenant, settings)
        for period, limit, used in (
            ("day", limits.daily_usd, spent.daily_usd),
            ("month", limits.monthly_usd, spent.monthly_usd),
        ):
            if limit is not None and limit > 0:
                out.append((tenant, period, float((used + spent.held_usd) / limit)))
    return out
