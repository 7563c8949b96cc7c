"""The limits of one provider call of a stream: how many pieces it may stream, and what it
may still spend once earlier calls billed text.

A provider that never stops must not stream, and bill, without end: a call is cut at the
request's max_tokens, else RUNAWAY_PIECES_PER_TOKEN times its model's most output tokens (the
headroom spares a relay that streams smaller pieces than tokens).

A cost cap (`max_cost_usd`) and a budget hold bound the whole request, not one call: the
`max_tokens` derived at submit fits the first call alone. A call that streamed text and was
cut (then retried), or sent text before its worker was killed, was billed by the provider, so
the next call gets only what the bound has left after it (streaming/billing.py's estimate),
and none at all when that no longer covers the prompt and one token. A request with neither a
cap nor a hold keeps its own `max_tokens` on every call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from core.db import session_scope
from costs.reservations import HELD
from models.intake_message import Lane
from models.tables import Request, Reservation
from rules.caps import tokens_within
from rules.prices import billed_lane, price_table
from streaming.billing import Billed

RUNAWAY_PIECES_PER_TOKEN = 4


def pieces_limit(body: dict[str, Any]) -> int | None:
    """The most pieces a call of `body` may stream (None: an unpriced model without a limit)."""
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    if value:
        return int(value)
    price = price_table().models.get(str(body.get("model") or ""))
    return price.max_output_tokens * RUNAWAY_PIECES_PER_TOKEN if price is not None else None


@dataclass(frozen=True, slots=True)
class SpendLimit:
    """The most a request may cost in all, and what sets it."""

    usd: Decimal
    what: str  # "max_cost_usd" or "budget hold"

    def next_call(
        self, model: str, prompt: int, calls: int, pieces: int, lane: Lane
    ) -> tuple[int, Decimal]:
        """(output tokens the next call may take, USD billed so far) after `calls` calls that
        streamed text of `prompt` tokens and `pieces` pieces, priced as the hold and the cap
        are (rules.prices.billed_lane); tokens under 1 when nothing is left for one."""
        try:
            price = price_table().get(model)
        except KeyError:  # an unpriced model has no cap or hold to keep to
            return 1 << 30, Decimal(0)
        route = billed_lane(lane)
        spent = price.cost(prompt * calls, pieces, route)
        return tokens_within(price, prompt, self.usd - spent, route), spent

    def spent_reason(self, spent: Decimal, calls: int) -> str:
        """Why a retry was not sent (the request's failure)."""
        return (
            f"not retried: {calls} earlier call(s) billed ~${spent:.6f} of the request's"
            f" {self.what} of ${self.usd}, which leaves too little for the prompt and one token"
        )


def read_limit(db_url: str, request_id: str) -> SpendLimit | None:
    """The tighter of the row's cost cap and its budget hold still held, or None (one read,
    on the rare path of a retry after billed text)."""
    with session_scope(db_url) as session:
        found = session.execute(
            select(Request.max_cost_usd, Reservation.amount_usd)
            .outerjoin(
                Reservation,
                (Reservation.request_id == Request.id) & (Reservation.state == HELD),
            )
            .where(Request.id == request_id)
        ).one_or_none()
    if found is None:
        return None
    cap, hold = found
    limits = [
        SpendLimit(usd, what)
        for usd, what in ((cap, "max_cost_usd"), (hold, "budget hold"))
        if usd is not None
    ]
    return min(limits, key=lambda limit: limit.usd) if limits else None


@dataclass(slots=True)
class CallBound:
    """One stream's bound on its calls: the limit is read once, at the first call after text
    was billed; `limit` is the current call's max_tokens when the bound sets it."""

    spend: SpendLimit | None = None
    spend_read: bool = False
    limit: int | None = None

    async def fit(
        self,
        read: Callable[[], Awaitable[SpendLimit | None]],
        billed: Billed,
        prompt: int,
        body: dict[str, Any],
        lane: Lane,
    ) -> str | None:
        """Fit the next call of `body` to what is left after `billed` (`read` reads the limit);
        the reason to fail instead when nothing is."""
        self.limit = None
        if not billed.calls:
            return None
        if not self.spend_read:
            self.spend, self.spend_read = await read(), True
        if self.spend is None:
            return None
        model = str(body.get("model") or "")
        tokens, spent = self.spend.next_call(model, prompt, billed.calls, billed.pieces, lane)
        if tokens < 1:
            return self.spend.spent_reason(spent, billed.calls)
        own = body.get("max_completion_tokens") or body.get("max_tokens")
        self.limit = min(tokens, int(own)) if own else tokens
        return None

    def body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The call's body: `body` with the bound's max_tokens, when it sets one."""
        if self.limit is None:
            return body
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        return {**body, key: self.limit}
