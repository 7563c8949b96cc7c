"""Request status moves: the only code that writes `requests.status`, and what an end does
(budget released, webhooks written) in the same transaction; `move_from_statement` leaves both
to its caller (a set-based statement that chains more work on the moved rows). The machine
itself: models/status.py.

Every move is a conditional UPDATE (`WHERE status IN <legal sources>`), so two workers racing
on one request cannot both move it, and a move that is no longer legal changes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    String,
    Update,
    any_,
    bindparam,
    func,
    literal_column,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from models.status import FINAL, SOURCES, IllegalTransition, Status
from models.tables import Request, utcnow


def _sources(to: Status, from_: Iterable[Status] | None) -> list[str]:
    legal = SOURCES[to]
    if from_ is None:
        return [s.value for s in legal]
    wanted = frozenset(from_)
    if not wanted <= legal:
        raise IllegalTransition(f"{sorted(wanted - legal)} -> {to} is not a legal move")
    return [s.value for s in wanted]


def _source_literals(to: Status, from_: Iterable[Status] | None) -> list[Any]:
    # Status names are our own constants; literal columns keep a statement the same text for
    # every call (executemany-able, compiled once).
    return [literal_column(f"'{s}'") for s in _sources(to, from_)]


def _release_budgets(session: Session, to: Status, request_ids: Sequence[str]) -> None:
    # A failed or cancelled request spends nothing more: free what its budget reservation holds.
    if to in (Status.FAILED, Status.CANCELLED) and request_ids:
        from costs.reservations import release

        release(session, request_ids)


def _announce(session: Session, to: Status, request_ids: Sequence[str]) -> None:
    # An ended request's webhooks go into the outbox in the transaction that ends it.
    if to in FINAL and request_ids:
        from webhooks.outbox import request_ended

        request_ended(session, request_ids, to.value)


def _final_fields(to: Status, values: dict[str, Any]) -> dict[str, Any]:
    if to in FINAL:
        values.setdefault("finished_at", utcnow())
    return values


def move(
    session: Session,
    request_id: str,
    to: Status,
    *,
    from_: Iterable[Status] | None = None,
    **values: Any,
) -> bool:
    """Move one request to `to` if its status is a legal source; True when it moved."""
    stmt = (
        update(Request)
        .where(Request.id == request_id, Request.status.in_(_sources(to, from_)))
        .values(status=to.value, **_final_fields(to, values))
        .execution_options(synchronize_session=False)
    )
    moved = session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
    if moved:
        _release_budgets(session, to, [request_id])
        _announce(session, to, [request_id])
    return bool(moved)


def move_many(
    session: Session,
    request_ids: Sequence[str],
    to: Status,
    *,
    from_: Iterable[Status] | None = None,
    **values: Any,
) -> int:
    """Move many requests with the same values; returns how many moved."""
    if not request_ids:
        return 0
    moved = 0
    sources = _sources(to, from_)
    fields = _final_fields(to, values)
    for start in range(0, len(request_ids), 5000):  # keep IN lists under driver limits
        chunk = list(request_ids[start : start + 5000])
        stmt = (
            update(Request)
            .where(Request.id.in_(chunk), Request.status.in_(sources))
            .values(status=to.value, **fields)
            .execution_options(synchronize_session=False)
        )
        moved += session.execute(stmt).rowcount  # type: ignore[attr-defined]
    _release_budgets(session, to, request_ids)
    if moved:
        _announce(session, to, request_ids)
    return moved


def start_streaming(
    session: Session, request_ids: Sequence[str], now: datetime
) -> list[tuple[str, int, str, str]]:
    """Move queued requests to `streaming` (a stream worker's claim) in one UPDATE ...
    RETURNING (PostgreSQL): the moved rows as (id, attempts, tenant, model).

    The statement is built once: a claim runs for every stream, and building and compiling an
    UPDATE cost more Python than sending it."""
    if not request_ids:
        return []
    params = {"ids": list(request_ids), "now": now}
    rows = session.connection().execute(_start_streaming(), params).all()
    return [(row[0], row[1], row[2], row[3]) for row in rows]


@functools.cache
def _start_streaming() -> Update:
    now = bindparam("now", type_=Request.__table__.c.updated_at.type)
    return (
        update(Request)
        .where(
            Request.id == any_(bindparam("ids", type_=ARRAY(String))),
            Request.status.in_(_source_literals(Status.STREAMING, [Status.QUEUED])),
        )
        .values(
            status=Status.STREAMING.value,
            started_at=func.coalesce(Request.started_at, now),
            heartbeat_at=now,
            updated_at=now,
        )
        .returning(Request.id, Request.attempts, Request.tenant, Request.model)
    )


def move_each(
    session: Session,
    rows: Sequence[Mapping[str, Any]],
    to: Status,
    *,
    from_: Iterable[Status] | None = None,
) -> int:
    """Move many requests, each with its own values, in one executemany.

    Every row is a mapping with `id` and the same other keys (e.g. text, usage, cost)."""
    if not rows:
        return 0
    keys = [k for k in rows[0] if k != "id"]
    sources = _source_literals(to, from_)
    extra = {"finished_at": utcnow()} if to in FINAL and "finished_at" not in keys else {}
    stmt = (
        update(Request)
        .where(Request.id == bindparam("_id"), Request.status.in_(sources))
        .values(status=to.value, **{k: bindparam(k) for k in keys}, **extra)
        .execution_options(synchronize_session=False)
    )
    params = [{"_id": r["id"], **{k: r[k] for k in keys}} for r in rows]
    result = session.connection().execute(stmt, params)
    _release_budgets(session, to, [r["id"] for r in rows])
    _announce(session, to, [r["id"] for r in rows])
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def move_from_statement(
    source: FromClause,
    to: Status,
    *,
    columns: Sequence[str],
    from_: Iterable[Status] | None = None,
    where: ColumnElement[bool] | None = None,
    **fixed: Any,
) -> Update:
    """Move every request listed in `source` (a table with `id` and `columns`, e.g. a temporary
    table filled by COPY): one UPDATE ... FROM, unexecuted, for a caller that chains more work
    on the moved rows in the same statement (a data-modifying CTE). Only for moves that release
    no budget (to succeeded): the caller settles them, and writes their webhooks
    (webhooks.outbox.request_ended) in the same transaction."""
    if to in (Status.FAILED, Status.CANCELLED):
        raise IllegalTransition(f"{to}: use move_many or move_each, which release the budgets")
    return _update_from(source, to, columns, from_, where, fixed)


def _update_from(
    source: FromClause,
    to: Status,
    columns: Sequence[str],
    from_: Iterable[Status] | None,
    where: ColumnElement[bool] | None,
    fixed: dict[str, Any],
) -> Update:
    stmt = update(Request).where(Request.id == source.c.id, Request.status.in_(_sources(to, from_)))
    if where is not None:
        stmt = stmt.where(where)
    values: dict[str, Any] = {c: source.c[c] for c in columns}
    values.update(fixed)
    values["updated_at"] = func.now()
    if to in FINAL:
        values.setdefault("finished_at", func.now())
    return stmt.values(status=to.value, **values).execution_options(synchronize_session=False)
