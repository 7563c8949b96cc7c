"""PostgreSQL: the succeeded ends of many streams written in one statement.

Each value travels as one array a column (`unnest`), so the statement's text is the same for
one end or a hundred: it is built once, compiled once (SQLAlchemy's cache) and prepared by
psycopg. It moves each row streaming -> succeeded only while its `attempts` still equal the
claim's (the fence, checked under the row's lock by the UPDATE itself), ledgers the moved rows
that have a cost and settles their reservations (costs.ledger.ledger_ctes), and returns the ids
it moved, with whether their tenants have webhooks; those go into the outbox in the same
transaction. At a steady arrival rate a flush holds one or two ends, so the cost of a statement
is the cost of an end: this replaces a lock, an update, a ledger insert and a reservation
lookup, each built and sent on its own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any

from sqlalchemy import (
    Boolean,
    Integer,
    Numeric,
    Select,
    String,
    Text,
    bindparam,
    cast,
    column,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

from costs.ledger import ledger_ctes
from lifecycle.moves import move_from_statement
from models.status import Status
from models.tables import Request, UTCDateTime
from webhooks.outbox import hooked_tenants_select, request_ended


@dataclass(frozen=True, slots=True)
class SucceededEnd:
    """One stream's succeeded end as the statement writes it."""

    id: str
    attempts: int  # the claim's: the row moves only while it still has these
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    usage_estimated: bool
    cost_usd: Decimal | None  # None: no ledger entry (no usage, or a model without a price)
    standard_cost_usd: Decimal | None
    error: str | None
    first_token_at: datetime | None
    lane: str | None  # with lane_reason: the lane the request left for (else unchanged)
    lane_reason: str | None
    model: str
    tier: str  # the tier billed
    # What the ledger charges: the answer's usage plus the text before it (End.billed).
    billed_prompt_tokens: int | None
    billed_completion_tokens: int | None
    billed_usage_estimated: bool


NAMES = tuple(f.name for f in fields(SucceededEnd))
# The arrays' types, not the columns' (String(), not String(32)): an explicit cast to
# VARCHAR(n) truncates silently, while the assignment to the column refuses an oversized value,
# as every other write of these columns does.
_TYPES: dict[str, TypeEngine[Any]] = {
    "id": String(),
    "attempts": Integer(),
    "text": Text(),
    "finish_reason": String(),
    "prompt_tokens": Integer(),
    "completion_tokens": Integer(),
    "usage_estimated": Boolean(),
    "cost_usd": Numeric(),
    "standard_cost_usd": Numeric(),
    "error": Text(),
    "first_token_at": UTCDateTime(),  # naive values read as UTC, as in every table
    "lane": String(),
    "lane_reason": String(),
    "model": String(),
    "tier": String(),
    "billed_prompt_tokens": Integer(),
    "billed_completion_tokens": Integer(),
    "billed_usage_estimated": Boolean(),
}
# The columns the move copies into `requests` as they are.
COPIED = (
    "text",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "usage_estimated",
    "cost_usd",
    "error",
    "first_token_at",
)


@cache
def _statement() -> Select[Any]:
    arrays = [cast(bindparam(f"e_{name}"), ARRAY(_TYPES[name])) for name in NAMES]
    values = func.unnest(*arrays).table_valued(*(column(n, _TYPES[n]) for n in NAMES))
    ends = select(*values.render_derived(name="v").c).cte("ends")
    moved = (
        move_from_statement(
            ends,
            Status.SUCCEEDED,
            columns=COPIED,
            from_=[Status.STREAMING],
            where=Request.attempts == ends.c.attempts,
            lane=func.coalesce(ends.c.lane, Request.lane),
            lane_reason=func.coalesce(ends.c.lane_reason, Request.lane_reason),
        )
        .returning(Request.id, Request.tenant)
        .cte("moved")
    )
    ledger, settled = ledger_ctes(
        moved, ends, model=ends.c.model, route="stream", tier=ends.c.tier, billed="billed_"
    )
    # Whether each moved row's tenant may receive webhooks, read by the same statement: most
    # ends have none to write, and then no second round trip asks.
    hooked = moved.c.tenant.in_(hooked_tenants_select())
    return select(moved.c.id, moved.c.tenant, hooked).add_cte(ledger, settled)


def succeed(session: Session, ends: Sequence[SucceededEnd]) -> set[str]:
    """Write `ends` and the webhooks of those that moved; the ids that moved. Sorted by id, so
    the rows are usually locked in id order (the plan decides; a deadlock rolls the flush back
    and the writer sends it again)."""
    if not ends:
        return set()
    rows = sorted(ends, key=lambda e: e.id)
    params = {f"e_{name}": [getattr(e, name) for e in rows] for name in NAMES}
    # On the session's connection: a Core statement needs none of the ORM's execution path.
    result = session.connection().execute(_statement(), params).all()
    hooked = [(rid, tenant) for rid, tenant, has_hooks in result if has_hooks]
    if hooked:
        tenants = sorted({tenant for _, tenant in hooked})
        request_ended(session, sorted(rid for rid, _ in hooked), Status.SUCCEEDED.value, tenants)
    return {rid for rid, _, _ in result}
