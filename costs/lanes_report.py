"""The savings report by lane: what each lane cost, and the counterfactual for the same requests
(tokens): all at the standard rate, all at the priority rate, and what Sheepdog paid."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.intake_message import LANES, Lane
from models.tables import CostEntry
from rules.prices import PriceTable, price_table

# The ledger keeps the tier billed; a lane is named after its tier (standard: the stream lane).
LANE_OF_TIER: dict[str, Lane] = {
    "priority": "priority",
    "standard": "stream",
    "flex": "flex",
    "batch": "batch",
}


def _usd(value: object) -> Decimal:
    return Decimal(0) if value is None else Decimal(str(value)).quantize(Decimal("1e-10"))


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


@dataclass(frozen=True)
class LaneCost:
    requests: int = 0
    cost_usd: Decimal = Decimal(0)

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "cost_usd": _plain(self.cost_usd)}


@dataclass(frozen=True)
class LaneSummary:
    """Cost per lane and the counterfactual of the same requests."""

    lanes: dict[str, LaneCost] = field(default_factory=dict)
    paid_usd: Decimal = Decimal(0)
    all_standard_usd: Decimal = Decimal(0)
    all_priority_usd: Decimal = Decimal(0)

    @property
    def saved_usd(self) -> Decimal:
        return self.all_standard_usd - self.paid_usd

    def to_json(self) -> dict[str, Any]:
        return {
            "lanes": {lane: self.lanes.get(lane, LaneCost()).to_json() for lane in LANES},
            "counterfactual": {
                "paid_usd": _plain(self.paid_usd),
                "all_standard_usd": _plain(self.all_standard_usd),
                "all_priority_usd": _plain(self.all_priority_usd),
                "saved_usd": _plain(self.saved_usd),
            },
        }


def lane_summary(
    session: Session, since: datetime | None, prices: PriceTable | None = None
) -> LaneSummary:
    """The ledger since `since` per lane; the all-priority figure prices each model's tokens
    at its priority rate (a model no longer in the price table counts at what it cost)."""
    table = prices or price_table()
    stmt = select(
        CostEntry.model,
        CostEntry.tier,
        func.count(),
        func.coalesce(func.sum(CostEntry.prompt_tokens), 0),
        func.coalesce(func.sum(CostEntry.completion_tokens), 0),
        func.sum(CostEntry.cost_usd),
        func.sum(CostEntry.standard_cost_usd),
    ).group_by(CostEntry.model, CostEntry.tier)
    if since is not None:
        stmt = stmt.where(CostEntry.created_at >= since)
    lanes: dict[str, LaneCost] = {}
    paid = standard = priority = Decimal(0)
    for model, tier, n, prompt, completion, cost, std in session.execute(stmt).all():
        lane = LANE_OF_TIER.get(str(tier), "stream")
        seen = lanes.get(lane, LaneCost())
        lanes[lane] = LaneCost(seen.requests + int(n), seen.cost_usd + _usd(cost))
        paid += _usd(cost)
        standard += _usd(std)
        if model in table:
            priority += table.cost(model, int(prompt), int(completion), "priority")
        else:
            priority += _usd(cost)
    return LaneSummary(lanes, paid, standard, priority)
