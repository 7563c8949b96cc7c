"""Ingest a finished batch job: stream its output and error files line by line, join each line
to its request by custom_id, and write results in bulk.

Re-runnable by design: every move is conditional (`batched` rows of this job only) and the
ledger ignores duplicates, so ingesting the same file twice, or resuming after a killed worker,
changes nothing already written. Requests that got no usable line go back to `queued` (up to
batch_max_attempts) or end `failed`; the job's cost is summed once, when it is marked ingested.
An emulated job (provider without a Batch API) has no files: its lines, in the same shapes, come
from the Redis list its executor wrote (batch/emulated_job.py).

The rooms: batch/results.py reads a line, batch/sink.py writes chunks (batch/bulk_write.py on
PostgreSQL), batch/download.py fetches the files, batch/leftovers.py settles what got no line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, update

from batch import emulated_job
from batch.download import result_lines, validation_failures
from batch.emulated_job import EMULATED
from batch.jobs import LostLock, job_lock, provider_of, unlock
from batch.leftovers import leftover_reason, settle_leftovers
from batch.results import parse_line
from batch.sink import Sink
from core.db import session_scope
from core.providers import ProviderConfig, client_for
from core.settings import Settings, get_settings
from models.status import BatchStatus, is_batch_final
from models.tables import BatchJob, utcnow
from rules.prices import PriceTable, load_price_table, provider_batch_discount
from webhooks.outbox import batch_ended

log = logging.getLogger("sheepdog.batch.ingest")

MALFORMED_LOGGED = 5


@dataclass
class IngestReport:
    job_id: str
    status: str = ""
    succeeded: int = 0
    failed: int = 0
    requeued: int = 0
    malformed: int = 0
    skipped: str | None = None  # why nothing was done (already ingested, busy, not final)
    cost_usd: Decimal = Decimal(0)


@dataclass(frozen=True)
class JobFacts:
    """What the ingest reads of a job row before it starts."""

    status: str
    errors: dict[str, Any] | None
    files: list[str | None]  # output, error
    input_file_id: str | None
    mode: str
    provider: str | None
    model: str
    ingested: bool


def ingest(
    job_id: str,
    settings: Settings | None = None,
    *,
    prices: PriceTable | None = None,
    lines: Iterable[bytes] | None = None,
) -> IngestReport:
    """Write a final job's results into its requests (idempotent; see the module docstring).

    `lines` (tests, tools): result lines to use instead of downloading the job's files."""
    settings = settings or get_settings()
    prices = prices or load_price_table(settings.price_table_file)
    job = _read_job(settings, job_id)
    if job is None:
        return IngestReport(job_id, skipped="no such job")
    if job.ingested:
        return IngestReport(job_id, job.status, skipped="already ingested")
    if not is_batch_final(job.status):
        return IngestReport(job_id, job.status, skipped=f"not final ({job.status})")
    try:
        provider: ProviderConfig | None = provider_of(settings, job.provider, job.model)
    except KeyError:
        provider = None  # no longer configured: price table rates, files unreachable
    discount = (
        provider_batch_discount(provider.batch_discount, job.mode) if provider is not None else None
    )
    lock = job_lock(settings, job_id)
    if not lock.acquire():
        return IngestReport(job_id, job.status, skipped="another ingest holds the job")
    sink = Sink(settings, job_id, prices, lock, discount, job.model)
    try:
        if lines is None:
            lines = _line_source(settings, job_id, job, provider)
        report = _write_all(settings, job_id, job, lines, sink)
    except LostLock as err:
        log.warning("%s; stopping this ingest", err)
        return IngestReport(job_id, job.status, skipped=str(err))
    finally:
        sink.close()
        unlock(lock)
    log.info(
        "job %s ingested: %d succeeded, %d failed, %d requeued, %d malformed lines, $%s",
        job_id,
        report.succeeded,
        report.failed,
        report.requeued,
        report.malformed,
        report.cost_usd,
    )
    return report


def _read_job(settings: Settings, job_id: str) -> JobFacts | None:
    with session_scope(settings.database_url) as session:
        job = session.get(BatchJob, job_id)
        if job is None:
            return None
        return JobFacts(
            status=job.status,
            errors=job.errors,
            files=[job.output_file_id, job.error_file_id],
            input_file_id=job.input_file_id,
            mode=job.mode,
            provider=job.provider,
            model=job.model,
            ingested=job.ingested_at is not None,
        )


def _line_source(
    settings: Settings, job_id: str, job: JobFacts, provider: ProviderConfig | None
) -> Iterable[bytes]:
    """The job's result lines: the emulated executor's list, or the provider's files."""
    if job.mode == EMULATED:
        return emulated_job.result_lines(settings, job_id)
    if provider is None:
        raise KeyError(f"job {job_id}: provider {job.provider!r} is not configured")
    client = client_for(provider)
    if job.status == BatchStatus.FAILED:
        return validation_failures(settings, client, job_id, job.input_file_id, job.errors)
    return result_lines(client, job.files)


def _write_all(
    settings: Settings, job_id: str, job: JobFacts, lines: Iterable[bytes], sink: Sink
) -> IngestReport:
    """Every line through the sink, then the leftovers, then the job marked ingested."""
    malformed = 0
    for raw in lines:
        parsed = parse_line(raw)
        if parsed is None:
            malformed += 1
            if malformed <= MALFORMED_LOGGED:
                log.warning("job %s: malformed result line: %.200r", job_id, raw)
            continue
        sink.add(*parsed)
    sink.flush()
    written = sink.written
    report = IngestReport(
        job_id, job.status, written.succeeded, written.failed, written.requeued, malformed
    )
    requeued, failed = settle_leftovers(settings, job_id, leftover_reason(job.status, job.errors))
    report.requeued += requeued
    report.failed += failed
    report.cost_usd = _finish(settings, job_id, malformed)
    if job.mode == EMULATED:
        emulated_job.forget(settings, job_id)
    return report


def _finish(settings: Settings, job_id: str, malformed: int) -> Decimal:
    """Mark the job ingested; its cost was added up chunk by chunk, in the transactions that
    wrote the answers (so it counts each answer once, whatever was resumed)."""
    with session_scope(settings.database_url) as session:
        marked = session.execute(
            update(BatchJob)
            .where(BatchJob.id == job_id, BatchJob.ingested_at.is_(None))
            .values(
                cost_usd=func.coalesce(BatchJob.cost_usd, 0),
                malformed_lines=malformed,
                ingested_at=utcnow(),
            )
            .returning(BatchJob.status)
        ).scalar()
        if marked is not None:  # the job's end, once: its tenants' batch webhooks
            batch_ended(session, job_id, marked)
        cost = session.scalar(select(BatchJob.cost_usd).where(BatchJob.id == job_id))
    return Decimal(str(cost or 0))
