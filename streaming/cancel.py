"""Cancelling a request: a queued one never starts, an in-flight stream stops within a second."""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import select

from core import keys
from core.db import session_scope
from core.redis_conn import get_redis
from core.settings import Settings, get_settings
from lifecycle.moves import move
from models.request import check_request_id
from models.status import Status, is_final
from models.tables import Request

CANCEL_FLAG_TTL_S = 7 * 24 * 3600  # longer than any queue wait; the flag is checked at start


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"  # it was recorded and had not ended: it ends `cancelled`
    ENDED = "already ended"  # succeeded, failed or cancelled before: nothing changed
    # No row: an unknown id, or a request still in the queue (a stream request's row is written
    # when a worker takes it). The flag is set all the same, so a queued one never starts.
    UNRECORDED = "not recorded"
    # In a provider batch: the provider has it, and a batch is cancelled whole or not at all,
    # so it ends with the batch's answer (and is billed as usual). Nothing changed.
    IN_BATCH = "in a batch"


def cancel_request(request_id: str, settings: Settings | None = None) -> bool:
    """Cancel `request_id`; False, and nothing changes, when it had already ended (succeeded,
    failed or cancelled) or is in a provider batch. See cancel_outcome; InvalidRequest for an
    id of the wrong shape."""
    return cancel_outcome(request_id, settings) in (
        CancelOutcome.CANCELLED,
        CancelOutcome.UNRECORDED,
    )


def cancel_outcome(request_id: str, settings: Settings | None = None) -> CancelOutcome:
    """Cancel `request_id` and say what that did. The id's shape is checked first (nothing is
    written for one that cannot be a request id: the flag's key is bounded).

    Sets the cancel flag (checked by a stream task before it starts) and announces the id on
    the cancel channel (every stream worker process stops the stream if it holds it). A row
    still `queued` is moved to `cancelled` here, whichever path it is on; a `batched` one is
    left to its batch (IN_BATCH)."""
    check_request_id(request_id)
    settings = settings or get_settings()
    # Read before announcing: a worker holding the stream ends the row `cancelled` a few ms
    # after the announcement, and that must not read as "had already ended". Two short
    # sessions: no database transaction stays open across the Redis calls.
    with session_scope(settings.database_url) as session:
        row = session.execute(
            select(Request.status, Request.route).where(Request.id == request_id)
        ).one_or_none()
    if row is not None and is_final(row.status):
        return CancelOutcome.ENDED
    if row is not None and row.status == Status.BATCHED:
        return CancelOutcome.IN_BATCH
    redis = get_redis(settings.redis_url)
    names = keys.of(settings)
    redis.set(names.cancel_flag(request_id), b"1", ex=CANCEL_FLAG_TTL_S)
    redis.publish(names.cancel_channel, request_id)
    if row is None:
        return CancelOutcome.UNRECORDED  # if it is in the queue, its task sees the flag
    from streaming.store import moved_attempts

    for _ in range(3):  # a row may move between the read and the move; read it again
        with session_scope(settings.database_url) as session:
            moved = move(
                session, request_id, Status.CANCELLED, from_=[Status.QUEUED], error="cancelled"
            )
            attempts = moved_attempts(session, request_id, moved)
            now = (
                None
                if moved
                else session.scalar(select(Request.status).where(Request.id == request_id))
            )
        if moved or now != Status.QUEUED:
            break
    if not moved:
        outcome = _after_the_move(now)
        if outcome is CancelOutcome.IN_BATCH:  # nothing changed: the flag must not act later
            redis.delete(names.cancel_flag(request_id))
        return outcome
    if attempts is not None and row.route == "stream":
        from streaming.out_of_band import publish_error

        publish_error(settings, request_id, "cancelled", attempts=attempts)
    return CancelOutcome.CANCELLED


def _after_the_move(status: str | None) -> CancelOutcome:
    """What a cancel did to a row it found queued but could not move, by its status now."""
    if status == Status.BATCHED:  # batched meanwhile
        return CancelOutcome.IN_BATCH
    if status is not None and is_final(status) and status != Status.CANCELLED:
        return CancelOutcome.ENDED
    # Streaming (its worker sees the announcement, or its task the flag), cancelled by one of
    # them already, or gone: the request ends `cancelled`.
    return CancelOutcome.CANCELLED
