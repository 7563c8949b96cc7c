"""What a stream worker writes when a stream ends: its text, usage, the tier that served it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from models.status import Status
from models.tables import max_chars, storable

LANE_REASON_CHARS = max_chars("lane_reason")


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
