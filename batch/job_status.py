"""Batch-job status moves: the only code that writes `batch_jobs.status`. The machine itself:
models/status.py (BatchStatus, BATCH_SOURCES).

Every move is a conditional UPDATE (`WHERE status IN <legal sources>`), so a poll, a repairer
and an emulated executor racing on one job cannot move it backwards or out of a final status.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from core.db import session_scope
from core.settings import Settings
from models.status import BATCH_FINAL, BATCH_SOURCES, BatchStatus, IllegalTransition
from models.tables import BatchJob, utcnow

# The Batch API's statuses: a relay may answer another word, which no move takes.
KNOWN = frozenset(s.value for s in BatchStatus)


def job_sources(to: BatchStatus, from_: Iterable[BatchStatus] | None = None) -> list[str]:
    """The statuses a move to `to` may start from: `from_` (which must be legal) or all legal."""
    legal = BATCH_SOURCES[to]
    if from_ is None:
        return sorted(s.value for s in legal)
    wanted = frozenset(from_)
    if not wanted <= legal:
        raise IllegalTransition(f"batch job {sorted(wanted - legal)} -> {to} is not a legal move")
    return sorted(s.value for s in wanted)


def move_job(
    session: Session,
    job_id: str,
    to: BatchStatus | str,
    *,
    from_: Iterable[BatchStatus] | None = None,
    **values: Any,
) -> bool:
    """Move one job to `to` (with `values`) if its status is a legal source; True when it
    moved. A final move stamps finished_at unless given. `to` may be a provider's status
    string (ValueError when it is not one)."""
    to = BatchStatus(to)
    values.setdefault("updated_at", utcnow())
    if to in BATCH_FINAL:
        values.setdefault("finished_at", utcnow())
    result = session.execute(
        update(BatchJob)
        .where(BatchJob.id == job_id, BatchJob.status.in_(job_sources(to, from_)))
        .values(status=to.value, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def move_job_now(
    settings: Settings,
    job_id: str,
    to: BatchStatus | str,
    *,
    from_: Iterable[BatchStatus] | None = None,
    **values: Any,
) -> bool:
    """`move_job` in a transaction of its own."""
    with session_scope(settings.database_url) as session:
        return move_job(session, job_id, to, from_=from_, **values)
