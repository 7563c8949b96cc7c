"""A mixed day for bench_lanes.py, scaled down: a "day" is a batch window of `window_s` real
seconds, and the deadlines of the low requests are spread over it (none, a window or more
away, the flex band, minutes away), with high and normal traffic around them."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select

from core.db import session_scope
from models.tables import CostEntry, Request

MODELS = ("gpt-4.1", "gpt-4.1-mini")


@dataclass(frozen=True)
class Mix:
    """Shares of a day's requests (the rest of the lows have no deadline)."""

    high: float = 0.08
    high_priority_lane: float = 0.04  # high requests that ask for the priority lane
    normal: float = 0.25
    low_far: float = 0.20  # a batch window or more away
    low_flex: float = 0.27  # before a batch window could end, past the flex lead
    low_close: float = 0.08  # too close for flex: the standard stream


def day(n: int, window_s: float, flex_lead_s: float, seed: int = 18) -> list[dict[str, Any]]:
    """n requests; deadlines are relative to now (the whole day is submitted at once)."""
    rng = random.Random(seed)
    mix = Mix()
    now = datetime.now(UTC)
    edges = [
        ("high_priority_lane", mix.high_priority_lane),
        ("high", mix.high),
        ("normal", mix.normal),
        ("low_far", mix.low_far),
        ("low_flex", mix.low_flex),
        ("low_close", mix.low_close),
    ]
    out = []
    for i in range(n):
        kind, draw, acc = "low_none", rng.random(), 0.0
        for name, share in edges:
            acc += share
            if draw < acc:
                kind = name
                break
        out.append(_request(i, kind, rng, now, window_s, flex_lead_s))
    return out


def _request(
    i: int, kind: str, rng: random.Random, now: datetime, window_s: float, lead_s: float
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODELS[i % len(MODELS)],
        "messages": [{"role": "user", "content": f"lanes day item {i}: summarise it"}],
        "max_tokens": 60,
        "metadata": {"kind": kind},
    }
    if kind.startswith("high"):
        body["priority"] = "high"
        if kind == "high_priority_lane":
            body["lane"] = "priority"
        return body
    if kind == "normal":
        return {**body, "priority": "normal"}
    body["priority"] = "low"
    span = {
        "low_far": (window_s * 1.2, window_s * 2.0),
        "low_flex": (lead_s * 2, window_s * 0.9),
        "low_close": (lead_s * 0.5, lead_s * 0.9),
    }.get(kind)
    if span is not None:
        body["deadline"] = (now + timedelta(seconds=rng.uniform(*span))).isoformat()
    return body


@dataclass(frozen=True)
class DayResult:
    """What a run's database says about the day."""

    requests: int
    succeeded: int
    with_deadline: int
    deadlines_met: int
    by_lane: dict[str, int]
    missed: dict[str, int]  # deadlines missed, by the lane the request ended on
    fell_back: int  # flex requests moved to the standard lane (flex refused near the deadline)
    paid: Decimal
    all_standard: Decimal
    all_priority: Decimal
    seconds: float
    flex_429s: int = 0  # flex calls the simulator refused for capacity


def wait_all(db: str, n: int, timeout_s: float) -> float:
    """Seconds until every row of the run has ended (TimeoutError past `timeout_s`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        with session_scope(db) as session:
            done = session.scalar(
                select(func.count())
                .select_from(Request)
                .where(Request.status.in_(["succeeded", "failed", "cancelled"]))
            )
        if int(done or 0) >= n:
            return time.monotonic() - start
        time.sleep(1)
    raise TimeoutError(f"the day had not ended after {timeout_s:g}s")


def result(db: str, seconds: float) -> DayResult:
    from costs.lanes_report import lane_summary

    with session_scope(db) as session:
        rows = session.execute(
            select(Request.status, Request.lane, Request.deadline, Request.finished_at)
        ).all()
        fell_back = session.scalar(
            select(func.count())
            .select_from(Request)
            .where(Request.lane_reason.like("%moved to stream%"))
        )
        summary = lane_summary(session, None)
        ledgered = session.scalar(select(func.count()).select_from(CostEntry))
    by_lane: dict[str, int] = {}
    for _, lane, _, _ in rows:
        by_lane[lane or "?"] = by_lane.get(lane or "?", 0) + 1
    timed = [(d, f) for _, _, d, f in rows if d is not None]
    missed: dict[str, int] = {}
    for _, lane, d, f in rows:
        if d is not None and (f is None or f > d):
            missed[lane or "?"] = missed.get(lane or "?", 0) + 1
    assert int(ledgered or 0) == sum(1 for s, *_ in rows if s == "succeeded")
    return DayResult(
        requests=len(rows),
        succeeded=sum(1 for s, *_ in rows if s == "succeeded"),
        with_deadline=len(timed),
        deadlines_met=sum(1 for d, f in timed if f is not None and f <= d),
        by_lane=by_lane,
        missed=missed,
        fell_back=int(fell_back or 0),
        paid=summary.paid_usd,
        all_standard=summary.all_standard_usd,
        all_priority=summary.all_priority_usd,
        seconds=seconds,
    )
