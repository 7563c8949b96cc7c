"""Which lane a request takes, and the one rule for how far away a deadline must be for each.

Lanes: priority, stream (standard) and flex run on the stream path, batch on the batch path.
People wait on high and normal: they stream (high may ask for the priority lane). A low request
takes the cheapest lane that meets its deadline among those its provider sells; relays without
service tiers keep today's two lanes (batch, or stream when the deadline cannot wait)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.settings import Settings
from models.intake_message import Lane, Route
from models.request import ChatRequest, Priority
from rules.prices import ModelPrice, PriceTable

# Equal prices go to the lane that spends the least of the provider's live capacity.
PREFERENCE: tuple[Lane, ...] = ("batch", "flex", "stream")


@dataclass(frozen=True, slots=True)
class LaneChoice:
    """The router's answer: the lane, its path, and why (kept in the row)."""

    lane: Lane
    reason: str
    escalated: bool = False  # a low request put on the stream path by its deadline

    @property
    def route(self) -> Route:
        return "batch" if self.lane == "batch" else "stream"


def lead_s(lane: Lane, settings: Settings, *, flushing: bool = False) -> float:
    """Seconds a deadline must be away for `lane` to meet it: a batch may take the whole batch
    window after the next flush (or none: `flushing`, a flush under way); a flex call may be
    slow and refused for capacity, and must leave time to fall back to the standard lane."""
    if lane == "batch":
        return settings.batch_window_s + (0 if flushing else settings.batch_flush_interval_s)
    if lane == "flex":
        return settings.flex_min_lead_s
    return 0.0


def horizon(
    lane: Lane, settings: Settings, now: datetime | None = None, *, flushing: bool = False
) -> datetime:
    """The instant before which a deadline cannot wait for `lane` (the one deadline rule)."""
    return (now or datetime.now(UTC)) + timedelta(seconds=lead_s(lane, settings, flushing=flushing))


def batch_horizon(
    settings: Settings, now: datetime | None = None, *, flushing: bool = False
) -> datetime:
    """`horizon` of the batch lane."""
    return horizon("batch", settings, now, flushing=flushing)


def cheapest_lane(
    deadline: datetime | None,
    settings: Settings,
    tiers: Collection[str],
    price: ModelPrice | None = None,
    now: datetime | None = None,
    *,
    flushing: bool = False,
) -> LaneChoice:
    """The cheapest of batch, flex (when sold) and stream that meets `deadline`."""
    now = now or datetime.now(UTC)
    open_: list[Lane] = [
        lane
        for lane in PREFERENCE
        if (lane != "flex" or "flex" in tiers)
        and (deadline is None or deadline >= horizon(lane, settings, now, flushing=flushing))
    ]

    def rate(lane: Lane) -> object:
        return sum(price.rates(lane)) if price is not None else 0

    if not open_:  # the deadline has passed (a late flush or salvage): no lane meets it
        return LaneChoice("stream", "low: stream, escalated (the deadline has passed)", True)
    lane = min(open_, key=lambda x: (rate(x), PREFERENCE.index(x)))
    if lane != "batch" and "batch" in open_:  # a batch would meet the deadline: dearer there
        return LaneChoice(lane, f"low: {lane}, cheaper than this provider's batch lane")
    return LaneChoice(lane, _why(lane, deadline, now, tiers), escalated=lane != "batch")


def _why(lane: Lane, deadline: datetime | None, now: datetime, tiers: Collection[str]) -> str:
    if lane == "batch":
        return "low: batch, the deadline allows a batch window" if deadline else "low: batch"
    left = f"deadline in {_span((deadline - now).total_seconds())}" if deadline else "no deadline"
    if lane == "flex":
        return f"low: flex, {left} is before a batch window could end"
    no_flex = "" if "flex" in tiers else "; the provider sells no flex tier"
    return f"low: stream, escalated ({left}, too close for batch or flex{no_flex})"


def _span(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def choose_lane(
    request: ChatRequest,
    settings: Settings,
    tiers: Collection[str] = (),
    prices: PriceTable | None = None,
    now: datetime | None = None,
) -> LaneChoice:
    """The lane for a new request, given the tiers its provider sells."""
    if request.priority is Priority.HIGH:
        if request.lane != "priority":
            return LaneChoice("stream", "high: streamed at the standard rate")
        if "priority" in tiers:
            return LaneChoice("priority", "high: asked for the priority lane")
        return LaneChoice("stream", "high: asked for priority; the provider sells no priority tier")
    if request.priority is Priority.NORMAL:
        return LaneChoice("stream", "normal: streamed")
    price = prices.get(request.model) if prices is not None and request.model in prices else None
    return cheapest_lane(request.deadline, settings, tiers, price, now)


def choose_route(request: ChatRequest, settings: Settings) -> tuple[Route, bool]:
    """(route, escalated) with today's two lanes: what a provider without tiers gets."""
    choice = choose_lane(request, settings)
    return choice.route, choice.escalated
