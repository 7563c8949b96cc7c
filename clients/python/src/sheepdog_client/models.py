"""What the server answers, as pydantic models of the client's own (it never imports Sheepdog).
Unknown fields are kept (`extra="allow"`), so a newer server does not break an older client."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False


class RequestView(BaseModel):
    """A request as its caller sees it (`GET /v1/requests/{id}`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    status: str
    priority: str
    route: str | None = None
    escalated: bool = False
    model: str
    tenant: str | None = None
    text: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    cost_usd: Decimal | None = None
    error: str | None = None
    attempts: int = 0
    batch_job_id: str | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    first_token_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def is_final(self) -> bool:
        """True once the request has ended (succeeded, failed or cancelled)."""
        return self.status in FINAL_STATUSES


class Page(BaseModel):
    """One page of `GET /v1/requests`; pass `next_cursor` back as `cursor` for the next."""

    model_config = ConfigDict(extra="allow")

    data: list[RequestView]
    next_cursor: str | None = None


class CancelResult(BaseModel):
    """`POST /v1/requests/{id}/cancel`: `cancelled` is False for a request that had ended."""

    model_config = ConfigDict(extra="allow")

    id: str
    cancelled: bool
    status: str | None = None


class Event(BaseModel):
    """One message of a request's event stream. `type` is `token` (with `text`), `reset` (a
    retry restarted the answer: drop the text shown so far), `done` (with `usage`, `cost_usd`,
    `finish_reason`) or `error` (with `error`, a reason a person can read)."""

    model_config = ConfigDict(extra="allow")

    request_id: str
    seq: int
    type: str
    text: str | None = None
    usage: Usage | None = None
    cost_usd: Decimal | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def is_final(self) -> bool:
        return self.type in ("done", "error")
