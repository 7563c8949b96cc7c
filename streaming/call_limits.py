"""The limits of one provider call of a stream: how many pieces it may stream, and what it
may still spend once earlier calls billed text.

A provider that never stops must not stream, and bill, without end: a call is cut at the
request's max_tokens, else RUNAWAY_PIECES_PER_TOKEN times its model's most output tokens (the
headroom spares a relay that streams smaller pieces than tokens).

A cost cap (`max_cost_usd`) and a budget bound the whole request, not one call: the
`max_tokens` derived at submit, and the hold reserved for it, fit the first call alone. A call
that streamed text and was cut (then retried), or sent text before its worker was killed, was
billed by the provider (streaming/billing.py's estimate), so the next call gets only what the
cap has left after it, and what the hold has once grown as far as the tenant's budget has room;
none at all when that no longer covers the prompt and one token. A request with neither a cap
nor a hold keeps its own `max_tokens` on every call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from core.db import session_scope
from core.settings import Settings
from costs.budgets import grow_hold
from models.intake_message import Lane
from models.tables import Request
from rules.caps import tokens_within, worst_call_cost
from rules.prices import billed_lane, price_table
from streaming.billing import Billed

RUNAWAY_PIECES_PER_TOKEN = 4


def own_limit(body: dict[str, Any]) -> int | None:
    """The output limit `body` asks for itself (None: none)."""
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(value) if value else None


def pieces_limit(body: dict[str, Any]) -> int | None:
    """The most pieces a call of `body` may stream (None: an unpriced model without a limit)."""
    if (own := own_limit(body)) is not None:
        return own
    price = price_table().models.get(str(body.get("model") or ""))
    return price.max_output_tokens * RUNAWAY_PIECES_PER_TOKEN if price is not None else None


@dataclass(frozen=True, slots=True)
class SpendLimit:
    """The most a request may cost in all, and what sets it."""

    usd: Decimal
    what: str  # "max_cost_usd" or "budget hold"

    def spent_reason(self, spent: Decimal, calls: int) -> str:
        """Why a retry was not sent (the request's failure)."""
        return (
            f"not retried: {calls} earlier call(s) billed ~${spent:.6f}, and the request's"
            f" {self.what} of ${self.usd.normalize():f} leaves too little for the prompt and"
            " one token"
        )


def read_limit(settings: Settings, request_id: str, needed: Decimal) -> SpendLimit | None:
    """The tighter of the row's cost cap and its budget hold, the hold first grown toward
    `needed` as far as the tenant's budget has room (costs.budgets.grow_hold): a hold is a
    reservation, not a limit the caller asked for. None: neither. On the rare path of a call
    after billed text only."""
    with session_scope(settings.database_url) as session:
        hold = grow_hold(session, settings, request_id, needed)
        cap = session.scalar(select(Request.max_cost_usd).where(Request.id == request_id))
    limits = [
        SpendLimit(usd, what)
        for usd, what in ((cap, "max_cost_usd"), (hold, "budget hold"))
        if usd is not None
    ]
    return min(limits, key=lambda limit: limit.usd) if limits else None


@dataclass(slots=True)
class CallBound:
    """One stream's bound on its calls; `limit` is the current call's max_tokens when the
    bound sets it."""

    limit: int | None = None

    async def fit(
        self,
        read: Callable[[Decimal], Awaitable[SpendLimit | None]],
        billed: Billed,
        count_prompt: Callable[[], int],
        body: dict[str, Any],
        lane: Lane,
    ) -> str | None:
        """Fit the next call of `body` to what is left after `billed`, priced as the hold and
        the cap are (rules.prices.billed_lane); `read` reads the limit for what the request
        would cost with the call's worst case, `count_prompt` counts the prompt (only when
        something was billed). The reason to fail instead when nothing is left for the prompt
        and one token."""
        self.limit = None
        if not billed.calls:
            return None
        try:
            price = price_table().get(str(body.get("model") or ""))
        except KeyError:  # an unpriced model has no cap or hold to keep to
            return None
        prompt, route, own = count_prompt(), billed_lane(lane), own_limit(body)
        spent = price.cost(prompt * billed.calls, billed.pieces, route)
        limit = await read(spent + worst_call_cost(price, prompt, own, lane))
        if limit is None:
            return None
        tokens = tokens_within(price, prompt, limit.usd - spent, route)
        if tokens < 1:
            return limit.spent_reason(spent, billed.calls)
        if own is not None:
            self.limit = min(tokens, own)
        elif tokens < price.max_output_tokens:  # else unbound, as the call was sent at first
            self.limit = tokens
        return None

    def body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The call's body: `body` with the bound's max_tokens, when it sets one."""
        if self.limit is None:
            return body
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        return {**body, key: self.limit}
