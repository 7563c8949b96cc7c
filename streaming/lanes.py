"""A stream-path lane while its request runs: the service tier asked for, the call's timeout,
and the flex rule: a flex 429 (capacity) is retried with backoff while the deadline allows,
then the request moves to the standard lane while `flex_fallback_lead_s` is still left."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.settings import Settings
from models.intake_message import Lane
from rules.backoff import backoff_s

TIER_ASKED: dict[str, str] = {"flex": "flex", "priority": "priority"}


def parse_deadline(value: object) -> datetime | None:
    """A deadline from an intake message (ISO text) or a row (datetime)."""
    if value is None:
        return None
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(when, datetime):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(slots=True)
class LaneRun:
    """The lane of one streaming request, as its attempts go."""

    settings: Settings
    lane: Lane = "stream"
    deadline: datetime | None = None
    moved: str | None = None  # why the request left its lane (kept in the row)
    flex_refusals: int = 0

    @property
    def flex(self) -> bool:
        return self.lane == "flex"

    def body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The provider body for this lane's tier."""
        tier = TIER_ASKED.get(self.lane)
        return {**body, "service_tier": tier} if tier else body

    def seconds_left(self) -> float | None:
        if self.deadline is None:
            return None
        return (self.deadline - datetime.now(UTC)).total_seconds()

    def timeout_s(self) -> float:
        """A flex call gets the SDK's long timeout, cut so that the standard lane still has its
        lead before the deadline; other lanes the provider timeout."""
        if not self.flex:
            return self.settings.provider_timeout_s
        left = self.seconds_left()
        timeout = self.settings.flex_timeout_s
        if left is not None:
            timeout = min(timeout, left - self.settings.flex_fallback_lead_s)
        return max(timeout, 1.0)

    def at_risk(self, wait_s: float = 0.0) -> bool:
        """True when a flex call after `wait_s` more would leave less than the fallback lead."""
        left = self.seconds_left()
        return left is not None and left - wait_s < self.settings.flex_fallback_lead_s

    def after_flex_429(self, retry_after: float | None) -> float | None:
        """The wait before trying flex again, or None: move to the standard lane now."""
        self.flex_refusals += 1
        settings = self.settings
        if self.flex_refusals >= settings.flex_max_attempts:
            self.fall_back(f"flex refused {self.flex_refusals} times (429)")
            return None
        delay = backoff_s(
            self.flex_refusals, settings.stream_backoff_base_s, settings.stream_backoff_max_s
        )
        delay = max(delay, retry_after or 0.0)
        if self.at_risk(delay):
            self.fall_back(f"flex refused {self.flex_refusals} times (429)")
            return None
        return delay

    def left_lane(self) -> dict[str, Any]:
        """The end's lane and lane_reason when the request left its lane (else nothing)."""
        return {} if self.moved is None else {"lane": self.lane, "lane_reason": self.moved}

    def fall_back(self, why: str) -> None:
        """Move to the standard lane, saying why and how long was left."""
        left = self.seconds_left()
        until = f", {left:.0f}s before the deadline" if left is not None else ""
        self.moved = f"moved to stream: {why}{until}"
        self.lane = "stream"
