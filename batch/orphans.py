"""The janitor's batch part: `batched` requests that no batch job will ever end.

A batched row waits for its job's ingest. If the job row is gone (deleted by hand, a restored
backup) or the job is already ingested and the row was still left `batched` (a bug, a manual
edit), nothing would ever move it again. Past batch_orphan_timeout_s such rows go back to
`queued` for the next flush, or end `failed` with the reason once they have used their
batch_max_attempts. Rows of a live job (preparing, open, or final but not yet ingested) are
never touched: the flush, poll and ingest own them. Every move is the lifecycle's conditional
UPDATE from `batched`, so two janitors at once take a row back once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select

from batch.leftovers import requeue_or_fail
from core.db import session_scope
from core.settings import Settings
from models.status import Status
from models.tables import BatchJob, Request, utcnow

log = logging.getLogger("sheepdog.batch.orphans")

SWEEP_LIMIT = 5000
NO_JOB = "its batch job no longer exists"
INGESTED = "its batch job was ingested without a result for it"


@dataclass
class OrphanReport:
    requeued: int = 0
    failed: int = 0


def sweep_batched(settings: Settings) -> OrphanReport:
    """Requeue (or fail, past max attempts) batched rows whose job is missing or ingested."""
    before = utcnow() - timedelta(seconds=settings.batch_orphan_timeout_s)
    report = OrphanReport()
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Request.id, Request.attempts, BatchJob.id)
            .outerjoin(BatchJob, BatchJob.id == Request.batch_job_id)
            .where(
                Request.status == Status.BATCHED.value,
                Request.updated_at < before,
                or_(BatchJob.id.is_(None), BatchJob.ingested_at.is_not(None)),
            )
            .limit(SWEEP_LIMIT)
        ).all()
        if not rows:
            return report
        report.requeued, report.failed = requeue_or_fail(
            session,
            settings,
            [(rid, attempts, NO_JOB if job is None else INGESTED) for rid, attempts, job in rows],
        )
    log.warning(
        "janitor: %d batched request(s) without a live job: %d requeued, %d failed",
        len(rows),
        report.requeued,
        report.failed,
    )
    return report
