"""Every bad input is refused at the edge with its own message, and nothing is enqueued."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import redis

from core.errors import InvalidRequest
from models.request import MAX_CONTENT_CHARS, ChatRequest, Priority
from rules.admission import parse_request

GOOD = {"model": "sheepdog-mini", "messages": [{"role": "user", "content": "hello"}]}


def bad(**changes: object) -> dict[str, object]:
    return {**GOOD, **changes}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            bad(priority="urgent"),
            "priority: unknown priority 'urgent' (expected high, normal or low)",
        ),
        (bad(model="gpt-9"), "model: unknown model 'gpt-9' (known: "),
        (
            bad(webhook_url="http://[::1/"),
            "webhook_url: webhook URL cannot be read: Invalid IPv6 URL",
        ),
        (bad(webhook_url="ftp://hooks.example.com/x"), "webhook_url: webhook URL must be http"),
        (bad(messages=[]), "messages: messages is empty"),
        (
            bad(messages=[{"role": "robot", "content": "x"}]),
            "messages.0.role: unknown role 'robot'",
        ),
        (
            bad(messages=[{"role": "user", "content": "   "}]),
            "messages.0.content: content is empty",
        ),
        (
            bad(messages=[{"role": "user", "content": "x" * (MAX_CONTENT_CHARS + 1)}]),
            "messages.0.content: content is 2,000,001 characters, over the limit",
        ),
        (bad(max_tokens=0), "max_tokens: max_tokens must be positive, got 0"),
        (bad(max_tokens=-5), "max_tokens: max_tokens must be positive, got -5"),
        (bad(max_cost_usd="-0.01"), "max_cost_usd: max_cost_usd must not be negative"),
        (
            bad(deadline=(datetime.now(UTC) - timedelta(minutes=1)).isoformat()),
            "deadline: deadline ",
        ),
        (bad(max_tokens=10**6), "exceeds sheepdog-mini's output limit of 2048"),
        (bad(temperature=3), "temperature: Input should be less than or equal to 2"),
        (bad(colour="blue"), "colour: Extra inputs are not permitted"),
        # What the tables cannot hold (PostgreSQL refuses it; SQLite would store it).
        (
            bad(metadata={"tenant": "t" * 101}),
            "metadata: tenant is 101 characters; a tenant is 1 to 100 characters",
        ),
        (bad(metadata={"tenant": "a\x00b"}), "metadata: tenant must be printable text"),
        (bad(metadata={"tenant": "a\x1bb"}), "metadata: tenant must be printable text"),
        (bad(max_cost_usd="1e10"), "max_cost_usd: max_cost_usd 1E+10 is too large"),
        (bad(max_cost_usd="1e30"), "max_cost_usd: max_cost_usd 1E+30 is too large"),
        (
            bad(deadline="9999-12-31T23:59:59-12:00"),
            "deadline: deadline 9999-12-31T23:59:59-12:00 is past the year 9999 in UTC",
        ),
        # A cap is a number as JSON writes it; a deadline a time, never a number of seconds
        # (read as Unix seconds or milliseconds by its size).
        (bad(max_cost_usd="1_000"), "max_cost_usd: max_cost_usd '1_000' is not a plain decimal"),
        (bad(max_cost_usd=" 5 "), "max_cost_usd: max_cost_usd ' 5 ' is not a plain decimal"),
        (bad(deadline=1965000000), "deadline: deadline must be an ISO 8601 time"),
        (bad(deadline="1965000000000"), "deadline: deadline must be an ISO 8601 time"),
        (bad(deadline=1.9e9), "deadline: deadline must be an ISO 8601 time"),
        (bad(idempotency_key="k\x00"), "idempotency_key: idempotency_key contains a NUL"),
        (bad(idempotency_key="k" * 201), "idempotency_key: String should have at most 200"),
        ("not an object", "expected an object, got str"),
    ],
)
def test_bad_input_is_refused_with_its_reason(payload: object, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request(payload)
    text = str(err.value)
    assert text.startswith("invalid request: ")
    assert message in text
    assert "\n" not in text


@pytest.mark.unit
@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (
            bad(messages=[{"role": "user", "content": "x"}, {"role": "robot", "content": "x"}]),
            "messages[1].role",
        ),
        (bad(metadata={"k": 5}), "metadata.k"),
        (bad(model="gpt-9"), "model"),
        (bad(max_tokens=10**6), "max_tokens"),
        (bad(max_cost_usd="abc"), "max_cost_usd"),
        (bad(messages=[{"role": "user", "content": "word " * 9000}]), "messages"),
        (bad(stop=[1]), "stop"),  # not stop.list[str]: a union's branch is no field
        (bad(lane="priority"), None),  # a rule across fields names none
    ],
)
def test_a_refusal_names_the_field_to_blame(payload: object, param: str | None) -> None:
    """`param` (OpenAI's error field) was null on every refusal of the request's own rules."""
    with pytest.raises(InvalidRequest) as err:
        parse_request(payload)
    assert err.value.param == param, err.value
    assert err.value.in_list(3).param == (f"[3].{param}" if param else "[3]")


@pytest.mark.unit
def test_a_cap_of_minus_zero_is_zero_and_a_plain_number_passes() -> None:
    assert str(parse_request(bad(max_cost_usd="-0")).max_cost_usd) == "0E-10"
    for given in ("5", "+5", "0.5", ".5", "5.", "1e-3", 0.25, 3):
        assert parse_request(bad(max_cost_usd=given)).max_cost_usd is not None, given


@pytest.mark.unit
def test_past_deadline_names_the_time() -> None:
    when = datetime(2020, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidRequest, match=r"deadline 2020-01-01T00:00:00\+00:00 is in the past"):
        parse_request(bad(deadline=when.isoformat()))


@pytest.mark.unit
def test_prompt_too_long_for_the_context_window() -> None:
    words = " ".join(["word"] * 9000)  # sheepdog-mini has an 8,192-token window
    with pytest.raises(InvalidRequest, match="too long for sheepdog-mini's context window"):
        parse_request(bad(messages=[{"role": "user", "content": words}]))


@pytest.mark.unit
def test_good_request_and_defaults() -> None:
    req = parse_request(bad(max_cost_usd="0.5", metadata={"tenant": "acme"}))
    assert isinstance(req, ChatRequest)
    assert req.priority is Priority.NORMAL
    assert req.max_cost_usd == Decimal("0.5")
    assert req.tenant == "acme"
    assert req.provider_body() == {"model": "sheepdog-mini", "messages": GOOD["messages"]}


def test_cost_cap_becomes_max_tokens(settings_env: None) -> None:
    from sheepdog.client import Client

    # sheepdog-mini: $0.10 in / $0.40 out per 1M. A $0.0004 cap on the stream route buys
    # (0.0004 - prompt cost) / 0.4e-6 output tokens.
    item = Client().prepare(bad(max_cost_usd="0.0004", priority="high"))
    prompt = 3 + 4 + 1  # priming + message overhead + one word
    expected = int((Decimal("0.0004") - Decimal("0.10") * prompt / 10**6) / Decimal("0.40") * 10**6)
    assert item.body["max_tokens"] == expected
    low = Client().prepare(bad(max_cost_usd="0.0004", priority="low"))
    # The batch rate is half: the same cap buys about twice the tokens.
    batch_expected = int(
        (Decimal("0.0004") - Decimal("0.05") * prompt / 10**6) / Decimal("0.20") * 10**6
    )
    assert low.body["max_tokens"] == batch_expected == 1998


def test_cap_too_small_for_the_prompt(settings_env: None) -> None:
    from sheepdog.client import Client

    with pytest.raises(InvalidRequest, match="does not cover the prompt"):
        Client().prepare(bad(max_cost_usd="0.0000001"))


def test_client_refuses_bad_batch_and_enqueues_nothing(
    settings_env: None, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    from core.settings import Settings
    from sheepdog.client import Client

    # A deployment of its own (key prefix): anything it enqueued would be under that prefix.
    prefix = f"t-val-{uuid.uuid4().hex[:8]}:"
    monkeypatch.setenv("SHEEPDOG_BROKER_PREFIX", prefix)
    with pytest.raises(InvalidRequest, match=r"request 2: invalid request: messages: messages is"):
        Client(Settings()).submit_many([GOOD, bad(priority="low"), bad(messages=[])])
    assert list(redis.Redis.from_url(redis_url).scan_iter(match=f"{prefix}*")) == []
