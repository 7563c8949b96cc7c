"""The intake message: the only task payload that carries a request itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# The two paths a request can take (rules/routing.py chooses; rules/prices.py prices each).
Route = Literal["stream", "batch"]
# The four lanes: priority, stream and flex run on the stream path (with the provider's
# service tier priority, default and flex), batch on the batch path.
Lane = Literal["priority", "stream", "flex", "batch"]
LANES: tuple[Lane, ...] = ("priority", "stream", "flex", "batch")
STREAM_LANES: frozenset[str] = frozenset({"priority", "stream", "flex"})


class IntakeItem(BaseModel):
    """One validated request as the producer sends it to a worker."""

    model_config = ConfigDict(extra="forbid")

    id: str
    route: Route
    lane: Lane | None = None  # None (a message from before lanes): the route's own lane
    lane_reason: str = ""  # why the router chose the lane (kept in the row)
    escalated: bool = False
    downgraded: bool = False  # a budget moved this normal-priority request to the batch path
    request: dict[str, Any]  # ChatRequest in JSON mode
    body: dict[str, Any]  # the provider body, max_tokens already derived from the cost cap
    submitted_at: datetime

    @property
    def lane_or_route(self) -> Lane:
        """The lane, or for a message without one, the lane its route always had."""
        return self.lane or self.route

    def argsrepr(self) -> str:
        """What Flower shows: ids, priority and model, never the prompt."""
        return (
            f"id={self.id} priority={self.request.get('priority')} model={self.body.get('model')}"
        )
