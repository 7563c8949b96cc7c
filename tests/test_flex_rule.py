"""The flex rule of a running stream (pure): its tier, its timeout, when it gives up on flex."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.settings import Settings
from streaming.lanes import LaneRun, parse_deadline

pytestmark = pytest.mark.unit

SETTINGS = Settings(
    flex_timeout_s=900,
    flex_fallback_lead_s=60,
    flex_max_attempts=5,
    stream_backoff_base_s=0.5,
    stream_backoff_max_s=4,
)


def run(lane: str = "flex", seconds_left: float | None = 600) -> LaneRun:
    deadline = None if seconds_left is None else datetime.now(UTC) + timedelta(seconds=seconds_left)
    return LaneRun(SETTINGS, lane, deadline)  # type: ignore[arg-type]


def test_the_tier_asked_for_each_lane() -> None:
    body = {"model": "m", "messages": []}
    assert run("flex").body(body)["service_tier"] == "flex"
    assert run("priority").body(body)["service_tier"] == "priority"
    assert "service_tier" not in run("stream").body(body)


def test_flex_timeout_is_long_but_leaves_the_fallback_its_lead() -> None:
    assert run(seconds_left=None).timeout_s() == 900
    assert 530 < run(seconds_left=600).timeout_s() <= 540
    assert run(seconds_left=30).timeout_s() == 1.0
    assert run("stream").timeout_s() == SETTINGS.provider_timeout_s


def test_a_429_is_retried_while_the_deadline_allows_then_moves_to_standard() -> None:
    lanes = run(seconds_left=600)
    delays = [lanes.after_flex_429(None) for _ in range(4)]
    assert all(d is not None and 0 < d <= 4 for d in delays)
    assert lanes.after_flex_429(None) is None  # the fifth refusal: flex_max_attempts
    assert lanes.lane == "stream" and lanes.moved is not None
    assert lanes.moved.startswith("moved to stream: flex refused 5 times (429)")


def test_a_429_near_the_deadline_moves_at_once() -> None:
    lanes = run(seconds_left=61)
    assert lanes.after_flex_429(retry_after=5) is None
    assert lanes.lane == "stream" and "before the deadline" in (lanes.moved or "")


def test_deadlines_from_messages_and_rows() -> None:
    naive = datetime(2030, 1, 1, 12, 0)
    assert parse_deadline(naive) == naive.replace(tzinfo=UTC)
    assert parse_deadline("2030-01-01T12:00:00+00:00") == naive.replace(tzinfo=UTC)
    assert parse_deadline(None) is None
