"""Cost caps: a request's `max_cost_usd` becomes a `max_tokens` through the price table."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal

from core.errors import InvalidRequest
from models.intake_message import Lane
from rules.prices import MILLION, ModelPrice, Priced, billed_lane, cost_usd


def max_tokens_for_cap(
    price: ModelPrice, model: str, prompt_tokens: int, cap_usd: Decimal, route: Priced
) -> int:
    """The most output tokens that keep prompt + output within `cap_usd` on `route`.

    Raises InvalidRequest when the cap does not even cover the prompt and one output token."""
    tokens = tokens_within(price, prompt_tokens, cap_usd, route)
    if tokens < 1:
        prompt_cost = cost_usd(price, prompt_tokens, 0, route)
        raise InvalidRequest(
            f"invalid request: max_cost_usd: ${cap_usd} does not cover the prompt (~{prompt_tokens}"
            f" tokens, ${prompt_cost:.6f} on {model} via {route}) plus one output token",
            "max_cost_usd",
        )
    return tokens


def tokens_within(price: ModelPrice, prompt_tokens: int, usd: Decimal, route: Priced) -> int:
    """The most output tokens one call with `prompt_tokens` can take within `usd` on `route`,
    at most the model's output limit; under 1 when `usd` does not cover the prompt and one."""
    _, rate_out = price.rates(route)
    left = usd - cost_usd(price, prompt_tokens, 0, route)
    if rate_out == 0:
        return price.max_output_tokens if left >= 0 else 0
    tokens = int((left * MILLION / rate_out).to_integral_value(rounding=ROUND_FLOOR))
    return min(tokens, price.max_output_tokens)


def effective_max_tokens(
    price: ModelPrice,
    model: str,
    prompt_tokens: int,
    max_tokens: int | None,
    cap_usd: Decimal | None,
    route: Priced,
) -> int | None:
    """The tighter of the caller's max_tokens and the cost cap's (None: no limit asked)."""
    if cap_usd is None:
        return max_tokens
    capped = max_tokens_for_cap(price, model, prompt_tokens, cap_usd, route)
    return capped if max_tokens is None else min(max_tokens, capped)


def output_limit(price: ModelPrice, max_tokens: int | None) -> int:
    """The output tokens a call may take: its `max_tokens`, else the model's output limit."""
    return int(max_tokens) if max_tokens else price.max_output_tokens


def worst_call_cost(
    price: ModelPrice, prompt_tokens: int, max_tokens: int | None, lane: Lane
) -> Decimal:
    """The most one call can cost: the prompt plus `output_limit`, at the rate that caps and
    holds a request on `lane` (rules.prices.billed_lane)."""
    return price.cost(prompt_tokens, output_limit(price, max_tokens), billed_lane(lane))
