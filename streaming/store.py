"""The streaming path's database work: claim a row, keep its heartbeat, write its end.

Status changes go through sheepdog.lifecycle; the claim (queued -> streaming) is the lock that
stops a redelivered or resent task from running a request twice. `attempts` is the fencing
token: the janitor bumps it when it takes a request back, so a worker that lost its request
cannot write the row's end or its heartbeat any more.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from costs import ledger
from costs.prices import price_table
from models.intake import IntakeItem
from models.tables import Request, utcnow
from sheepdog.db import session_scope
from sheepdog.intake import record_requests
from sheepdog.lifecycle import Status, move

# A thousand stream threads must not open a thousand connections: past the engine's pool size
# every extra session would open (and on return close) a fresh connection, which costs far more
# than waiting a moment for a pooled one.
DB_SLOTS = 16
_slots = threading.BoundedSemaphore(DB_SLOTS)


@contextmanager
def _session(db_url: str) -> Iterator[Session]:
    with _slots, session_scope(db_url) as session:
        yield session


@dataclass(frozen=True, slots=True)
class Claim:
    """A request this worker now owns."""

    attempts: int
    tenant: str
    model: str


@dataclass(frozen=True, slots=True)
class RowState:
    status: str
    body: dict[str, Any]
    heartbeat_at: datetime | None


class Fenced(Exception):
    """The row was taken back (attempts moved on) while this worker streamed it."""


def load(db_url: str, request_id: str) -> RowState | None:
    with _session(db_url) as session:
        row = session.execute(
            select(Request.status, Request.body, Request.heartbeat_at).where(
                Request.id == request_id
            )
        ).one_or_none()
    return RowState(row.status, row.body, row.heartbeat_at) if row else None


def claim(db_url: str, request_id: str, item: IntakeItem | None) -> Claim | None:
    """Record the row when `item` is given (idempotent) and move it queued -> streaming, in one
    transaction. None when it is not queued (final, cancelled or owned by another worker)."""
    now = utcnow()
    with _session(db_url) as session:
        if item is not None:
            record_requests(session, [item])
        moved = move(
            session,
            request_id,
            Status.STREAMING,
            from_=[Status.QUEUED],
            started_at=func.coalesce(Request.started_at, now),
            heartbeat_at=now,
            updated_at=now,
        )
        if not moved:
            return None
        row = session.execute(
            select(Request.attempts, Request.tenant, Request.model).where(Request.id == request_id)
        ).one()
    return Claim(row.attempts, row.tenant, row.model)


def cancel_queued(db_url: str, request_id: str, item: IntakeItem | None) -> bool:
    """Record the row if needed and move it queued -> cancelled; True when it moved."""
    with _session(db_url) as session:
        if item is not None:
            record_requests(session, [item])
        return move(session, request_id, Status.CANCELLED, from_=[Status.QUEUED], error="cancelled")


def touch_heartbeats(db_url: str, owned: Mapping[str, int]) -> set[str]:
    """Refresh heartbeat_at of the streaming rows in `owned` (id -> attempts) in one UPDATE;
    returns the ids this worker still owns."""
    if not owned:
        return set()
    now = utcnow()
    with _session(db_url) as session:
        rows = session.execute(
            update(Request)
            .where(Request.id.in_(list(owned)), Request.status == Status.STREAMING.value)
            .values(heartbeat_at=now)
            .returning(Request.id, Request.attempts)
            .execution_options(synchronize_session=False)
        ).all()
    return {rid for rid, attempts in rows if owned.get(rid) == attempts}


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


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int) -> Decimal | None:
    """Cost at the standard (stream) rate; None for a model missing from the price table."""
    try:
        return price_table().get(model).cost(prompt_tokens, completion_tokens, "stream")
    except KeyError:
        return None


def finish(db_url: str, request_id: str, claim: Claim, end: End) -> Decimal | None:
    """Write the end of a claimed stream; on success the ledger entry goes in the same
    transaction. Raises Fenced when the row is no longer this worker's; returns the cost."""
    cost = None
    if end.prompt_tokens is not None and end.completion_tokens is not None:
        cost = cost_usd(claim.model, end.prompt_tokens, end.completion_tokens)
    with _session(db_url) as session:
        moved = move(
            session,
            request_id,
            end.status,
            from_=[Status.STREAMING],
            text=end.text,
            finish_reason=end.finish_reason,
            prompt_tokens=end.prompt_tokens,
            completion_tokens=end.completion_tokens,
            usage_estimated=end.usage_estimated,
            cost_usd=cost,
            error=end.error,
            first_token_at=end.first_token_at,
            updated_at=utcnow(),
        )
        attempts = session.scalar(select(Request.attempts).where(Request.id == request_id))
        if not moved or attempts != claim.attempts:
            raise Fenced(request_id)  # rolls the move back
        if end.status is Status.SUCCEEDED and cost is not None:
            assert end.prompt_tokens is not None and end.completion_tokens is not None
            ledger.record(
                session,
                [
                    ledger.Usage(
                        request_id=request_id,
                        tenant=claim.tenant,
                        model=claim.model,
                        route="stream",
                        prompt_tokens=end.prompt_tokens,
                        completion_tokens=end.completion_tokens,
                        estimated=end.usage_estimated,
                    )
                ],
            )
    return cost
