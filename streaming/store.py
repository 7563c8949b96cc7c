"""The streaming path's database work: claim a row, keep its heartbeat, write its end.

Status changes go through lifecycle/moves.py; the claim (queued -> streaming) is the lock that
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

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.db import get_engine, is_postgres, session_scope
from costs import ledger
from costs.reservations import release
from lifecycle.moves import move, move_each, start_streaming
from lifecycle.record import (
    in_insert_order,
    record_requests,
    record_unstorable,
    refusal,
    row_values,
)
from models.intake_message import IntakeItem
from models.status import Status
from models.tables import Request, utcnow
from rules.prices import served_tier
from streaming import end_rows
from streaming.end import End, stream_cost
from streaming.fresh_rows import insert_fresh

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
    fresh: bool = False  # never streamed before this claim: no replay log can exist yet


@dataclass(frozen=True, slots=True)
class RowState:
    status: str
    body: dict[str, Any]
    heartbeat_at: datetime | None
    lane: str | None = None
    deadline: datetime | None = None
    attempts: int = 0  # taken back by the janitor this many times


class Fenced(Exception):
    """The row was taken back (attempts moved on) while this worker streamed it."""


class Unavailable(Exception):
    """The database did not answer in time (down, restarting, or a call that hung)."""


class Unstorable(Exception):
    """The request's row cannot be written as sent (a value the table cannot hold): it was
    recorded `failed` with the reason instead (`keyed`: with its idempotency key)."""

    def __init__(self, reason: str, keyed: bool) -> None:
        super().__init__(reason)
        self.reason, self.keyed = reason, keyed


_TRANSIENT = (
    Unavailable,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # no pooled connection within pool_timeout
    psycopg.OperationalError,  # raw driver calls (insert_fresh) are not wrapped
    psycopg.InterfaceError,
)


def is_transient(err: BaseException) -> bool:
    """True for errors of the database being away (worth the same work again later), not of
    the work itself."""
    if isinstance(err, _TRANSIENT):
        return True
    return isinstance(err, sa_exc.DBAPIError) and bool(err.connection_invalidated)


def load(db_url: str, request_id: str) -> RowState | None:
    with _session(db_url) as session:
        row = session.execute(
            select(
                Request.status,
                Request.body,
                Request.heartbeat_at,
                Request.lane,
                Request.deadline,
                Request.attempts,
            ).where(Request.id == request_id)
        ).one_or_none()
    return RowState(*row) if row else None


def claim(db_url: str, request_id: str, item: IntakeItem | None) -> Claim | None:
    """Record the row when `item` is given (idempotent) and move it queued -> streaming, in one
    transaction. None when it is not queued (final, cancelled or owned by another worker).
    Raises Unstorable when the database refuses the new row for its values."""
    try:
        with _session(db_url) as session:
            return _claim_in(session, request_id, item)
    except Exception as err:
        if item is None or is_transient(err):
            raise
        reason = f"request could not be stored: {refusal(err)}"
    with _session(db_url) as session:
        keyed = record_unstorable(session, item, reason, keep_key=True)
        if not keyed and not record_unstorable(session, item, reason, keep_key=False):
            raise Unavailable(reason)  # nothing can be written: sent again, then the log
        release(session, [request_id])  # a failed request spends nothing
    raise Unstorable(reason, keyed)


def claim_many(
    db_url: str, wanted: Mapping[str, IntakeItem | None], *, rows_first: bool = True
) -> dict[str, Claim]:
    """`claim` for many requests in one transaction; returns the ones this worker now owns.

    On PostgreSQL there are two statements for a batch, in the order that usually needs only
    the first: the conditional queued -> streaming move of rows that exist, and the insert of
    new rows straight `streaming` (INSERT ... ON CONFLICT DO NOTHING RETURNING) for requests
    whose intake message is given. `rows_first`: producers write the rows (the default), so
    by the time a task runs its row is nearly always there and the move goes first; a request
    it did not find is inserted, and one that conflicted there had its row committed in
    between and takes the move once more. Otherwise the insert goes first and the move takes
    what already had a row (id-only messages, rows the janitor took back). Elsewhere every
    request takes `claim`'s way."""
    now = utcnow()
    claims: dict[str, Claim] = {}
    with _session(db_url) as session:
        if not is_postgres(session):
            return {rid: c for rid, item in wanted.items() if (c := _claim_in(session, rid, item))}

        def move_queued(ids: list[str]) -> None:
            for rid, attempts, tenant, model in start_streaming(session, ids, now):
                claims[rid] = Claim(attempts, tenant, model, fresh=attempts == 0)

        def insert_new() -> list[str]:
            """Insert the new rows of what is not claimed yet; the ids that conflicted."""
            rows = []
            for rid, item in wanted.items():
                if item is not None and rid not in claims:
                    values = row_values(item, Status.STREAMING)
                    values["metadata"] = values.pop("metadata_")  # Core insert: column names
                    values.update(started_at=now, heartbeat_at=now, updated_at=now)
                    rows.append(values)
            if not rows:
                return []
            rows = in_insert_order(rows)
            for rid, attempts, tenant, model in insert_fresh(session, rows):
                claims[rid] = Claim(attempts, tenant, model, fresh=True)
            return [str(row["id"]) for row in rows if row["id"] not in claims]

        if rows_first:
            move_queued(list(wanted))
            # READ COMMITTED: this statement sees a row committed while the insert waited.
            move_queued(insert_new())
        else:
            insert_new()
            move_queued([rid for rid in wanted if rid not in claims])
    return claims


def _claim_in(session: Session, request_id: str, item: IntakeItem | None) -> Claim | None:
    now = utcnow()
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
    # A row never taken back (attempts 0) has never been streamed: no replay log exists.
    return Claim(row.attempts, row.tenant, row.model, fresh=row.attempts == 0)


def ended_as(db_url: str, request_id: str, claim: Claim, end: End) -> bool:
    """True when the row already holds this end under this claim: a write whose commit went
    through while its acknowledgement was lost (the database went away meanwhile), so the
    retry was refused as fenced."""
    with _session(db_url) as session:
        row = session.execute(
            select(Request.status, Request.attempts, Request.text).where(Request.id == request_id)
        ).one_or_none()
    return (
        row is not None
        and row.status == end.status.value
        and row.attempts == claim.attempts
        and (row.text or "") == end.text
    )


def cancel_queued(db_url: str, request_id: str, item: IntakeItem | None) -> int | None:
    """Record the row if needed and move it queued -> cancelled; its attempts (the fence its
    `error` message goes out under) when it moved, else None."""
    with _session(db_url) as session:
        if item is not None:
            record_requests(session, [item])
        return moved_attempts(
            session,
            request_id,
            move(session, request_id, Status.CANCELLED, from_=[Status.QUEUED], error="cancelled"),
        )


def moved_attempts(session: Session, request_id: str, moved: bool) -> int | None:
    """The row's attempts after a move in this transaction (None when it did not move)."""
    if not moved:
        return None
    return int(session.scalar(select(Request.attempts).where(Request.id == request_id)) or 0)


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


def finish(db_url: str, request_id: str, claim: Claim, end: End) -> Decimal | None:
    """Write the end of a claimed stream; an end with usage is charged (the ledger entry) in the
    same transaction. Raises Fenced when the row is no longer this worker's; returns the cost."""
    cost = end.cost(claim.model)
    with _session(db_url) as session:
        if cost is not None:
            # Charged before the move: a cancelled or failed stream's hold settles to its charge
            # rather than being released by the move (Fenced rolls both back).
            ledger.record(session, [end.usage(request_id, claim.tenant, claim.model)])
        moved = move(
            session,
            request_id,
            end.status,
            from_=[Status.STREAMING],
            updated_at=utcnow(),
            **end.row_values(cost),
        )
        attempts = session.scalar(select(Request.attempts).where(Request.id == request_id))
        if not moved or attempts != claim.attempts:
            raise Fenced(request_id)  # rolls the move back
    return cost


def finish_many(
    db_url: str, ends: Mapping[str, tuple[Claim, End]]
) -> dict[str, Decimal | Fenced | None]:
    """`finish` for many streams in one transaction: each id maps to its cost, or to Fenced
    when its row is no longer this worker's.

    On PostgreSQL the succeeded ends (nearly all) are one statement (streaming/end_rows.py:
    fenced move, ledger, reservations); the others lock their rows (SELECT ... FOR UPDATE),
    compare each claim's attempts and move in one executemany per status. Elsewhere (SQLite,
    one writer at a time anyway) each end is its own `finish`."""
    if not ends:
        return {}
    if not is_postgres(get_engine(db_url)):
        out: dict[str, Decimal | Fenced | None] = {}
        for rid, (claim, end) in ends.items():
            try:
                out[rid] = finish(db_url, rid, claim, end)
            except Fenced as err:
                out[rid] = err
        return out
    others = {rid: v for rid, v in ends.items() if v[1].status is not Status.SUCCEEDED}
    rows = [_succeeded_end(rid, *v) for rid, v in ends.items() if rid not in others]
    with _session(db_url) as session:
        result = _fail_or_cancel(session, others)
        moved = end_rows.succeed(session, rows)
    for row in rows:
        result[row.id] = row.cost_usd if row.id in moved else Fenced(row.id)
    return result


def _succeeded_end(rid: str, claim: Claim, end: End) -> end_rows.SucceededEnd:
    cost = end.cost(claim.model)
    billed = end.billed()
    standard = None
    if cost is not None:  # priced, so the tokens are there
        assert billed is not None
        standard = stream_cost(claim.model, *billed, "standard")
    return end_rows.SucceededEnd(
        id=rid,
        attempts=claim.attempts,
        standard_cost_usd=standard,
        model=claim.model,
        tier=served_tier(end.service_tier),
        billed_prompt_tokens=billed[0] if billed else None,
        billed_completion_tokens=billed[1] if billed else None,
        billed_usage_estimated=end.billed_estimated,
        **({"lane": None, "lane_reason": None} | end.row_values(cost)),
    )


def _fail_or_cancel(
    session: Session, ends: Mapping[str, tuple[Claim, End]]
) -> dict[str, Decimal | Fenced | None]:
    """PostgreSQL: the ends that are not succeeded, under their rows' locks (ids in order)."""
    result: dict[str, Decimal | Fenced | None] = {}
    if not ends:
        return result
    ids = sorted(ends)  # one lock order for every writer
    current = dict(
        session.execute(
            select(Request.id, Request.attempts)
            .where(Request.id.in_(ids), Request.status == Status.STREAMING.value)
            .order_by(Request.id)
            .with_for_update()
        ).all()
    )
    # One executemany per final status and set of columns (a lane change adds two).
    by_status: dict[tuple[Status, bool], list[dict[str, Any]]] = {}
    billed: list[ledger.Usage] = []  # those that streamed text before their end
    now = utcnow()
    for rid in ids:
        claim, end = ends[rid]
        if current.get(rid) != claim.attempts:
            result[rid] = Fenced(rid)
            continue
        cost = result[rid] = end.cost(claim.model)
        if cost is not None:
            billed.append(end.usage(rid, claim.tenant, claim.model))
        row = {"id": rid, "updated_at": now, "finished_at": now, **end.row_values(cost)}
        by_status.setdefault((end.status, "lane" in row), []).append(row)
    # Charged before the move, under the rows' locks, so that their holds settle to it.
    ledger.record(session, billed)
    for (status, _), rows in by_status.items():
        moved = move_each(session, rows, status, from_=[Status.STREAMING])
        if moved != len(rows):  # cannot happen under the row locks; never write half
            raise RuntimeError(f"finish_many: {moved} of {len(rows)} rows moved")
    return result
