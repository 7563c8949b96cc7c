"""A request's reservation after submit: settled to its actual cost when it succeeds
(costs.ledger.record), released when it fails, is cancelled or never reached a worker.
Reserving at submit is costs/budgets.py."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session

from core.db import among
from models.status import FINAL
from models.tables import Request, Reservation, utcnow

HELD, SETTLED, RELEASED = "held", "settled", "released"
IN_CHUNK = 5000  # keep IN lists under driver limits


def settle(session: Session, actual: Sequence[tuple[str, Decimal]]) -> int:
    """Settle held reservations to their request's actual cost (ledger.record calls this)."""
    if not actual:
        return 0
    # Most traffic has no budget: find the few held reservations first (one indexed SELECT per
    # chunk) instead of an UPDATE per request, which dominated bulk ingests.
    ids = [rid for rid, _ in actual]
    held: set[str] = set()
    for start in range(0, len(ids), IN_CHUNK):
        chunk = ids[start : start + IN_CHUNK]
        held.update(
            session.scalars(
                select(Reservation.request_id).where(
                    among(session, Reservation.request_id, chunk), Reservation.state == HELD
                )
            )
        )
    actual = [(rid, cost) for rid, cost in actual if rid in held]
    if not actual:
        return 0
    stmt = (
        update(Reservation)
        .where(Reservation.request_id == bindparam("rid"), Reservation.state == HELD)
        .values(state=SETTLED, settled_usd=bindparam("cost"), settled_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    params = [{"rid": rid, "cost": cost} for rid, cost in actual]
    result = session.connection().execute(stmt, params)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def release(session: Session, request_ids: Sequence[str]) -> int:
    """Release the held reservations of `request_ids` (failed, cancelled or never sent)."""
    released = 0
    for start in range(0, len(request_ids), IN_CHUNK):
        chunk = list(request_ids[start : start + IN_CHUNK])
        stmt = (
            update(Reservation)
            .where(Reservation.request_id.in_(chunk), Reservation.state == HELD)
            .values(state=RELEASED, settled_usd=Decimal(0), settled_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        released += int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]
    return released


def release_stale(session: Session, older_than: timedelta = timedelta(hours=1)) -> int:
    """Release reservations held longer than `older_than` whose request never reached a worker
    (the producer died between reserve and send) or has ended without settling them."""
    cutoff = utcnow() - older_than
    stale = (
        select(Reservation.request_id)
        .outerjoin(Request, Request.id == Reservation.request_id)
        .where(
            Reservation.state == HELD,
            Reservation.created_at < cutoff,
            or_(Request.id.is_(None), Request.status.in_(sorted(FINAL))),
        )
    )
    return release(session, list(session.scalars(stale)))
