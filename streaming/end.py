"""How a stream ended: its job's result, and the end the worker writes of it to the row (its
text, usage, the tier that served it, what is charged)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from costs import ledger
from models.status import Status
from models.tables import max_chars, storable
from rules.prices import Tier, cost_usd, price_table, served_tier

LANE_REASON_CHARS = max_chars("lane_reason")


@dataclass(frozen=True, slots=True)
class TakenBack:
    """What the provider billed a succeeded stream for text before its answer (answers a retry
    took back, an earlier attempt's before its worker was killed), estimated (billing.py)."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class End:
    """What the worker writes when a stream ends."""

    status: Status
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_estimated: bool = False
    error: str | None = None
    first_token_at: datetime | None = None
    service_tier: str | None = None  # the response's: the tier billed
    lane: str | None = None  # set with lane_reason when the request left its lane
    lane_reason: str | None = None
    taken_back: TakenBack | None = None  # charged, not in the answer's usage

    def __post_init__(self) -> None:
        # A provider's error message may carry a NUL too; it is published as stored.
        if self.error is not None:
            object.__setattr__(self, "error", storable(self.error))

    def row_values(self, cost_usd: Any) -> dict[str, Any]:
        """The row's columns this end writes (with the cost it was priced at), the lane's
        among them only when the request left its lane."""
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usage_estimated": self.usage_estimated,
            "cost_usd": cost_usd,
            "error": self.error,
            "first_token_at": self.first_token_at,
            **self.lane_values(),
        }

    def lane_values(self) -> dict[str, Any]:
        """The row's lane columns when the request left its lane (else nothing to write)."""
        if self.lane is None or self.lane_reason is None:
            return {}
        return {"lane": self.lane, "lane_reason": self.lane_reason[:LANE_REASON_CHARS]}

    def billed(self) -> tuple[int, int] | None:
        """The prompt and completion tokens charged: the answer's usage and what was taken
        back before it; None without usage."""
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        back = self.taken_back or TakenBack(0, 0)
        return (
            self.prompt_tokens + back.prompt_tokens,
            self.completion_tokens + back.completion_tokens,
        )

    @property
    def billed_estimated(self) -> bool:
        """Whether any of what is charged is a local count."""
        return self.usage_estimated or self.taken_back is not None

    def cost(self, model: str) -> Decimal | None:
        """Priced at the tier that served it; None without usage or for an unpriced model."""
        billed = self.billed()
        if billed is None:
            return None
        return stream_cost(model, *billed, served_tier(self.service_tier))

    def usage(self, request_id: str, tenant: str, model: str) -> ledger.Usage:
        """The ledger entry of an end with usage (estimated when any of it is)."""
        billed = self.billed()
        assert billed is not None
        return ledger.Usage(
            request_id=request_id,
            tenant=tenant,
            model=model,
            route="stream",
            tier=served_tier(self.service_tier),
            prompt_tokens=billed[0],
            completion_tokens=billed[1],
            estimated=self.billed_estimated,
        )


@dataclass(frozen=True, slots=True)
class StreamResult:
    """How a job ended: the end its runner writes to the row, or None when the row is lost
    (another worker's now), and how many provider calls it made (for the log)."""

    end: End | None
    provider_calls: int = 0


def stream_cost(
    model: str, prompt_tokens: int, completion_tokens: int, tier: Tier = "standard"
) -> Decimal | None:
    """Cost at `tier`'s rate (the one that served the call); None for a model missing from
    the price table."""
    try:
        price = price_table().get(model)
    except KeyError:
        return None
    return cost_usd(price, prompt_tokens, completion_tokens, tier)
