"""The poll: refresh every open batch job from its provider, cancel jobs open too long, send
again the executor of an emulated job whose heartbeat lapsed, and name the jobs whose results are
ready to ingest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import openai
from sqlalchemy import or_, select

from batch import emulated_job
from batch.batch_object import batch_values, status_of
from batch.emulated_job import EMULATED
from batch.flush import repair_preparing
from batch.job_status import KNOWN, move_job_now
from batch.jobs import provider_of
from core.db import session_scope
from core.providers import client_for
from core.settings import Settings, get_settings
from models.status import BATCH_FINAL, BATCH_OPEN, BatchStatus
from models.tables import BatchJob

log = logging.getLogger("sheepdog.batch.poll")


@dataclass
class PollReport:
    checked: int = 0
    changed: int = 0
    cancelled: list[str] = field(default_factory=list)
    repaired: int = 0
    resent: int = 0  # emulated jobs whose executor was sent again (heartbeat lapsed)
    to_ingest: list[str] = field(default_factory=list)


def poll(settings: Settings | None = None) -> PollReport:
    """Check every open job once; returns the ids of final, not yet ingested jobs."""
    settings = settings or get_settings()
    report = PollReport(repaired=repair_preparing(settings))
    with session_scope(settings.database_url) as session:
        jobs = session.execute(
            select(
                BatchJob.id,
                BatchJob.provider_batch_id,
                BatchJob.status,
                BatchJob.submitted_at,
                BatchJob.provider,
                BatchJob.model,
            )
            .where(
                BatchJob.status.in_(sorted(s.value for s in BATCH_OPEN)),
                BatchJob.provider_batch_id.is_not(None),
                BatchJob.mode != EMULATED,
            )
            .order_by(BatchJob.created_at)
        ).all()
    max_wait = timedelta(seconds=settings.batch_max_wait_s)
    grace = timedelta(seconds=settings.batch_orphan_timeout_s)
    now = datetime.now(UTC)
    resent, cancelled = emulated_job.watch(settings, max_wait, now)
    report.resent += resent
    report.cancelled.extend(cancelled)
    for job_id, batch_id, old_status, submitted_at, provider, model in jobs:
        assert batch_id is not None  # selected with provider_batch_id IS NOT NULL
        report.checked += 1
        try:
            client = client_for(provider_of(settings, provider, model))
            batch = client.batches.retrieve(batch_id)
            status = status_of(batch)
            if (
                status not in BATCH_FINAL  # open, or a status no Batch API has: waits no longer
                and status != BatchStatus.CANCELLING
                and submitted_at is not None
                and now - submitted_at > max_wait
            ):
                log.warning(
                    "job %s: open longer than %s, cancelling %s", job_id, max_wait, batch_id
                )
                batch = client.batches.cancel(batch_id)
                report.cancelled.append(job_id)
        except (openai.APIError, KeyError) as err:
            log.warning("job %s: cannot retrieve %s: %s", job_id, batch_id, err)
            continue
        status = status_of(batch)
        over = submitted_at is not None and now - submitted_at > max_wait + grace
        stuck = status == BatchStatus.CANCELLING or (
            status not in KNOWN and job_id in report.cancelled
        )
        if stuck and over:
            # Cancelled past the wait, and still cancelling (or a status of the relay's own) a
            # grace period after it (a cancel takes a while to finish): it would never end,
            # nor would its requests. Ended here; the ingest takes whatever file the provider
            # names and requeues the rest, as for any cancelled batch.
            log.warning(
                "job %s: provider status %r past the wait limit; ended as cancelled",
                job_id,
                status,
            )
            status = BatchStatus.CANCELLED.value
        elif status not in KNOWN:  # a relay's own word: keep polling, move nothing
            log.warning("job %s: provider status %r is not a Batch API status", job_id, status)
            continue
        move_job_now(settings, job_id, status, **batch_values(batch))
        if status != old_status:
            report.changed += 1
            log.info("job %s: %s -> %s", job_id, old_status, status)
    with session_scope(settings.database_url) as session:
        report.to_ingest = list(
            session.scalars(
                select(BatchJob.id)
                .where(
                    BatchJob.status.in_(sorted(s.value for s in BATCH_FINAL)),
                    BatchJob.ingested_at.is_(None),
                    or_(BatchJob.provider_batch_id.is_not(None), BatchJob.mode == EMULATED),
                )
                .order_by(BatchJob.created_at)
            ).all()
        )
    return report
