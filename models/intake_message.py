"""The intake message: the only task payload that carries a request itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# The two paths a request can take (rules/routing.py chooses; rules/prices.py prices each).
Route = Literal["stream", "batch"]


class IntakeItem(BaseModel):
    """One validated request as the producer sends it to a worker."""

    model_config = ConfigDict(extra="forbid")

    id: str
    route: Route
    escalated: bool = False
    downgraded: bool = False  # a budget moved this normal-priority request to the batch path
    request: dict[str, Any]  # ChatRequest in JSON mode
    body: dict[str, Any]  # the provider body, max_tokens already derived from the cost cap
    submitted_at: datetime

    def argsrepr(self) -> str:
        """What Flower shows: ids, priority and model, never the prompt."""
        return (
            f"id={self.id} priority={self.request.get('priority')} model={self.body.get('model')}"
        )
