"""The router's lane table over deadlines and provider capabilities (pure: no service)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from core.errors import InvalidRequest
from core.settings import Settings
from models.request import validate_request
from rules.prices import load_price_table
from rules.routing import choose_lane, horizon, lead_s

pytestmark = pytest.mark.unit

# A 24h batch window after a 60 s flush; flex needs 5 minutes.
SETTINGS = Settings(batch_window_s=24 * 3600, batch_flush_interval_s=60, flex_min_lead_s=300)
BOTH = ("flex", "priority")
H = 3600

TABLE = [
    # priority, deadline (s from now; None: none), lane asked, tiers, lane, escalated
    ("low", None, None, BOTH, "batch", False),
    ("low", None, None, (), "batch", False),
    ("low", 30 * H, None, BOTH, "batch", False),
    ("low", 1 * H, None, BOTH, "flex", True),  # the case: an hour away keeps batch rate
    ("low", 1 * H, None, (), "stream", True),  # a relay without tiers: today's escalation
    ("low", 1 * H, None, ("priority",), "stream", True),
    ("low", 301, None, BOTH, "flex", True),
    ("low", 120, None, BOTH, "stream", True),  # too close for flex
    ("normal", None, None, BOTH, "stream", False),
    ("normal", 1 * H, None, BOTH, "stream", False),
    ("high", None, None, BOTH, "stream", False),
    ("high", None, "priority", BOTH, "priority", False),
    ("high", None, "priority", ("flex",), "stream", False),  # asked, not sold
    ("high", None, "priority", (), "stream", False),
]


def request(
    priority: str, deadline_s: int | None, lane: str | None, now: datetime | None = None
) -> dict[str, object]:
    """A request body; the deadline counts from `now` (the test's own clock: the schema refuses
    a deadline already past, and collection may precede a test by minutes)."""
    data: dict[str, object] = {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "hi"}],
        "priority": priority,
    }
    if deadline_s is not None:
        data["deadline"] = ((now or datetime.now(UTC)) + timedelta(seconds=deadline_s)).isoformat()
    if lane is not None:
        data["lane"] = lane
    return data


@pytest.mark.parametrize(("priority", "deadline_s", "asked", "tiers", "lane", "escalated"), TABLE)
def test_lane_table(
    priority: str,
    deadline_s: int | None,
    asked: str | None,
    tiers: tuple[str, ...],
    lane: str,
    escalated: bool,
) -> None:
    now = datetime.now(UTC)
    req = validate_request(request(priority, deadline_s, asked, now))
    choice = choose_lane(req, SETTINGS, tiers, load_price_table(), now)
    assert (choice.lane, choice.escalated) == (lane, escalated)
    assert choice.route == ("batch" if lane == "batch" else "stream")
    assert choice.reason.startswith(priority) and len(choice.reason) <= 200


def test_reasons_explain_the_choice() -> None:
    now = datetime.now(UTC)
    flex = choose_lane(validate_request(request("low", H, None, now)), SETTINGS, BOTH, None, now)
    assert flex.reason == "low: flex, deadline in 60m is before a batch window could end"
    relay = choose_lane(validate_request(request("low", H, None, now)), SETTINGS, (), None, now)
    assert "the provider sells no flex tier" in relay.reason


def test_a_cheaper_flex_rate_wins_over_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from rules.prices import parse_price_file

    path = tmp_path / "p.toml"
    path.write_text(
        '[models."gpt-4.1"]\ninput_per_million = "2"\noutput_per_million = "8"\n'
        "flex_discount = 0.6\n"
    )
    now = datetime.now(UTC)
    req = validate_request(request("low", None, None))
    cheaper = choose_lane(req, SETTINGS, BOTH, parse_price_file(path), now)
    assert (cheaper.lane, cheaper.escalated) == ("flex", False)  # its price, not its deadline
    assert cheaper.reason == "low: flex, cheaper than this provider's batch lane"
    assert choose_lane(req, SETTINGS, (), parse_price_file(path), now).lane == "batch"


def test_an_emulated_batch_lane_at_the_standard_rate_loses_to_flex() -> None:
    """The lane is chosen at the rates the provider bills (costs/provider_prices.py): a relay
    with no Batch API bills its batch lines at the standard rate, flex is cheaper."""
    now = datetime.now(UTC)
    req = validate_request(request("low", None, None))
    billed = load_price_table().at_batch_discounts({"gpt-4.1": Decimal(0)})
    assert choose_lane(req, SETTINGS, BOTH, billed, now).lane == "flex"
    assert choose_lane(req, SETTINGS, (), billed, now).lane == "batch"  # no flex sold: a tie
    assert choose_lane(req, SETTINGS, BOTH, load_price_table(), now).lane == "batch"


def test_one_horizon_rule_per_lane() -> None:
    assert lead_s("batch", SETTINGS) == 24 * H + 60
    assert lead_s("batch", SETTINGS, flushing=True) == 24 * H
    assert lead_s("flex", SETTINGS) == 300
    assert lead_s("stream", SETTINGS) == lead_s("priority", SETTINGS) == 0
    now = datetime.now(UTC)
    assert horizon("flex", SETTINGS, now) == now + timedelta(seconds=300)


def test_priority_lane_only_for_high() -> None:
    with pytest.raises(InvalidRequest, match="lane 'priority' is for priority high, not low"):
        validate_request(request("low", None, "priority"))
    with pytest.raises(InvalidRequest, match="lane"):
        validate_request(request("high", None, "flex"))


def test_priority_rate_is_dearer() -> None:
    price = load_price_table().get("gpt-4.1")
    assert sum(price.rates("priority")) > sum(price.rates("stream")) > sum(price.rates("flex"))
    assert price.rates("flex") == (Decimal("1.000"), Decimal("4.000"))


def test_a_deadline_already_past_still_gets_a_lane() -> None:
    """A flush or a salvage can meet a row after its deadline: it is streamed, never a crash."""
    from rules.routing import cheapest_lane

    now = datetime.now(UTC)
    choice = cheapest_lane(now - timedelta(seconds=5), SETTINGS, BOTH, None, now)
    assert (choice.lane, choice.escalated) == ("stream", True)
    assert "deadline has passed" in choice.reason
