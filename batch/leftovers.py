"""Requests a batch gave no usable result: back to `queued` for a later batch, or `failed` once
they have used their batch_max_attempts. Used by the ingest (after both files) and by the
janitor (batched rows whose job is gone)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from batch.salvage import salvage
from core.db import begin_write, session_scope
from core.settings import Settings
from lifecycle.moves import move_each
from models.status import BatchStatus, Status
from models.tables import Request

LEFTOVER_REASON: Mapping[str, str] = {
    BatchStatus.COMPLETED: "the batch returned no result line for this request",
    BatchStatus.EXPIRED: "the batch expired before this request ran",
    BatchStatus.CANCELLED: "the batch was cancelled before this request ran",
    BatchStatus.FAILED: "the batch failed",
}


def requeue_or_fail(
    session: Session, settings: Settings, rows: Iterable[tuple[str, int, str]]
) -> tuple[int, int]:
    """Send (id, attempts, reason) rows whose deadline cannot wait for another batch window to
    a stream lane (batch/salvage.py: flex when sold), the others back to `queued` for the next
    batch, or fail those that have used their batch_max_attempts. Returns (requeued, failed);
    requeued counts the salvaged ones."""
    rest, salvaged = salvage(session, settings, list(rows))
    again: list[dict[str, Any]] = []
    final: list[dict[str, Any]] = []
    for request_id, attempts, reason in rest:
        if attempts < settings.batch_max_attempts:
            again.append({"id": request_id, "batch_job_id": None, "error": f"retrying: {reason}"})
        else:
            final.append(
                {"id": request_id, "error": f"{reason} (gave up after {attempts} batch attempts)"}
            )
    requeued = move_each(session, again, Status.QUEUED, from_=[Status.BATCHED])
    failed = move_each(session, final, Status.FAILED, from_=[Status.BATCHED])
    return requeued + salvaged, failed


def leftover_reason(status: str, errors: dict[str, Any] | None) -> str:
    """Why a request of a job that ended `status` got no result."""
    reason = LEFTOVER_REASON.get(status, f"the batch ended {status}")
    data = (errors or {}).get("data") or []
    if status == BatchStatus.FAILED and data and isinstance(data[0], dict):
        reason += f": {data[0].get('code')}: {data[0].get('message')}"
    return reason


def settle_leftovers(settings: Settings, job_id: str, reason: str) -> tuple[int, int]:
    """Requeue or fail the job's requests still `batched` after both files, a chunk per
    transaction. Returns (requeued, failed)."""
    requeued = failed = 0
    while True:
        with session_scope(settings.database_url) as session:
            begin_write(session)
            rows = session.execute(
                select(Request.id, Request.attempts)
                .where(Request.batch_job_id == job_id, Request.status == Status.BATCHED.value)
                .limit(settings.batch_ingest_chunk)
            ).all()
            if not rows:
                return requeued, failed
            again, ended = requeue_or_fail(
                session, settings, [(rid, attempts, reason) for rid, attempts in rows]
            )
        requeued += again
        failed += ended
        if again + ended == 0:
            return requeued, failed  # nothing movable (cannot happen under the job lock)
