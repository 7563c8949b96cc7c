"""What callers read back about a request (client.get, `sheepdog status --json`)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, field_serializer

from models.status import is_final
from models.tables import Request


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False


class RequestView(BaseModel):
    """A request as its caller sees it."""

    model_config = ConfigDict(frozen=True)

    id: str
    status: str
    priority: str
    route: str
    lane: str | None = None  # priority | stream | flex | batch (None: not yet recorded)
    lane_reason: str | None = None  # why the router chose it, or why the request left it
    escalated: bool
    model: str
    tenant: str
    text: str | None
    finish_reason: str | None
    usage: Usage | None
    cost_usd: Decimal | None
    error: str | None
    attempts: int
    batch_job_id: str | None
    idempotency_key: str | None
    metadata: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    first_token_at: datetime | None
    finished_at: datetime | None

    @field_serializer("cost_usd")
    def _usd(self, value: Decimal | None) -> str | None:
        return None if value is None else format(value.normalize(), "f")

    @classmethod
    def from_row(cls, row: Request) -> RequestView:
        usage = None
        if row.prompt_tokens is not None or row.completion_tokens is not None:
            usage = Usage(
                prompt_tokens=row.prompt_tokens or 0,
                completion_tokens=row.completion_tokens or 0,
                estimated=row.usage_estimated,
            )
        return cls(
            id=row.id,
            status=row.status,
            priority=row.priority,
            route=row.route,
            lane=row.lane or row.route,
            lane_reason=row.lane_reason,
            escalated=row.escalated,
            model=row.model,
            tenant=row.tenant,
            text=row.text,
            finish_reason=row.finish_reason,
            usage=usage,
            cost_usd=row.cost_usd,
            error=row.error,
            attempts=row.attempts,
            batch_job_id=row.batch_job_id,
            idempotency_key=row.idempotency_key,
            metadata=row.metadata_,
            created_at=row.created_at,
            started_at=row.started_at,
            first_token_at=row.first_token_at,
            finished_at=row.finished_at,
        )

    @property
    def is_final(self) -> bool:
        return is_final(self.status)
