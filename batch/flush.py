"""The flush: claim queued batch requests, write one JSONL file per job, upload it and create
the provider batch, so that a crash at any point is repaired by the next flush or poll.

Order of durable steps for a job (each committed before the next provider call):
1. claim: job row `preparing` + its requests `batched` (one transaction);
2. upload the file, record `input_file_id`;
3. create the batch with metadata `{"sheepdog_job_id": job id}`, record `provider_batch_id`.
A `preparing` job found later is first looked up at the provider by that metadata: if the
batch exists it is adopted, otherwise the file is (re)uploaded and the batch created. The job
lock (Redis, with a TTL) keeps a live submitter and a repairer from both creating it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import openai
import redis
from sqlalchemy import select

from batch.claim import Group, claim
from batch.emulated_job import EMULATED, submit_emulated
from batch.job_status import move_job
from batch.jobs import (
    crash_point,
    holding,
    job_lock,
    mark_empty,
    provider_of,
    unlock,
    update_job,
)
from batch.jsonl import write_job_file
from batch.low_count import count_down
from batch.provider_batch import (
    cancel_duplicate,
    create_batch,
    find_provider_batch,
    record_batch,
)
from core.celery_app import celery_for
from core.db import analyze, session_scope
from core.errors import scrub_secrets
from core.providers import client_for, load_providers, resolve_batch_mode
from core.settings import Settings, get_settings
from lifecycle.dispatch import send_stream
from lifecycle.moves import move_each, move_many
from models.status import BatchStatus, Status
from models.tables import BatchJob, Request, utcnow
from rules.prices import provider_batch_discount

log = logging.getLogger("sheepdog.batch.flush")

ANALYZE_AFTER = 10_000  # claimed rows from which a flush refreshes the statistics
# Refusals no retry can fix (a wrong key, a forbidden model, an endpoint the provider lacks):
# the job's requests fail with the provider's reason instead of the job waiting forever.
REFUSED = (
    openai.AuthenticationError,
    openai.PermissionDeniedError,
    openai.BadRequestError,
    openai.NotFoundError,
    openai.UnprocessableEntityError,
)  # provider/our clock skew tolerated when paging batches.list
# A job's submit or repair that failed on these stays `preparing`: the next flush or poll
# finishes it.
REPAIRABLE = (
    openai.APIError,
    redis.RedisError,
    OSError,
    KeyError,
)


@dataclass
class JobReport:
    job_id: str
    model: str
    lines: int
    bytes: int
    provider_batch_id: str | None
    adopted: bool = False


@dataclass
class FlushReport:
    """What one flush did (the CLI prints it)."""

    jobs: list[JobReport] = field(default_factory=list)
    claimed: int = 0
    escalated: int = 0
    failed: int = 0
    repaired: int = 0

    def summary(self) -> str:
        parts = [f"claimed {self.claimed} requests into {len(self.jobs)} batch job(s)"]
        if self.repaired:
            parts.append(f"repaired {self.repaired} unfinished job(s)")
        if self.escalated:
            parts.append(f"escalated {self.escalated} to the stream path (deadline)")
        if self.failed:
            parts.append(f"failed {self.failed} unwritable request(s)")
        return "; ".join(parts)


def flush(settings: Settings | None = None, *, crash_after: str | None = None) -> FlushReport:
    """Repair unfinished jobs, then claim what is queued and submit it.

    `crash_after` (tests only): raise SimulatedCrash right after "claim", "write", "upload" or
    "create", leaving state exactly as a process dying there would (minus the lock's TTL)."""
    settings = settings or get_settings()
    report = FlushReport()
    repair_preparing(settings, report, crash_after=crash_after)
    locks: dict[str, Any] = {}

    def take_locks(groups: list[Group]) -> None:
        # Locked before the claim commits, so no repairer can see the jobs unlocked.
        for g in groups:
            lock = job_lock(settings, g.job_id)
            lock.acquire()
            locks[g.job_id] = lock

    try:
        with session_scope(settings.database_url) as session:
            result = claim(session, settings, on_groups=take_locks)
        report.claimed = result.claimed
        if result.claimed >= ANALYZE_AFTER:
            # Thousands of rows just changed status: without fresh statistics the planner
            # takes them for a handful, and the ingest's joins hash the whole batched set
            # per chunk instead of probing by primary key (autovacuum's own analyze may be
            # minutes away).
            analyze(settings.database_url, "requests")
        report.failed += len(result.too_large)
        report.escalated = len(result.escalated)
        _escalate(settings, result.escalated, result.flex)
        count_down(settings, result.claimed + len(result.escalated) + len(result.too_large))
        crash_point(crash_after, "claim")
        for g in result.groups:
            try:
                job = submit_job(settings, g.job_id, crash_after=crash_after, fresh=True)
            except REFUSED as err:
                report.failed += give_up_job(settings, g.job_id, err)
                continue
            except REPAIRABLE as err:
                # The job stays `preparing`; the next flush or poll finishes it.
                log.warning("job %s: submit failed, will be repaired: %s", g.job_id, err)
                continue
            finally:
                unlock(locks.pop(g.job_id))
            if job is not None:
                report.failed += job[1]
                report.jobs.append(job[0])
    finally:
        for lock in locks.values():
            unlock(lock)
    if report.claimed or report.jobs or report.escalated:
        log.info("flush: %s", report.summary())
    return report


def repair_preparing(
    settings: Settings, report: FlushReport | None = None, *, crash_after: str | None = None
) -> int:
    """Finish every `preparing` job no live process holds: adopt or (re)submit it."""
    with session_scope(settings.database_url) as session:
        ids = session.scalars(
            select(BatchJob.id)
            .where(BatchJob.status == BatchStatus.PREPARING.value)
            .order_by(BatchJob.created_at)
        ).all()
    repaired = 0
    for job_id in ids:
        with holding(settings, job_id) as taken:
            if not taken:
                continue  # its submitter is alive (or died less than a lock TTL ago)
            try:
                done = submit_job(settings, job_id, crash_after=crash_after, fresh=False)
            except REFUSED as err:
                failed = give_up_job(settings, job_id, err)
                if report is not None:
                    report.failed += failed
                continue
            except REPAIRABLE as err:
                log.warning("job %s: repair failed, will retry: %s", job_id, err)
                continue
        if done is not None:
            repaired += 1
            if report is not None:
                report.repaired += 1
                report.failed += done[1]
                report.jobs.append(done[0])
    return repaired


def give_up_job(settings: Settings, job_id: str, err: openai.APIStatusError) -> int:
    """End a job the provider refused: it becomes `failed` (and counts as ingested, nothing
    will come back) and its requests fail with the provider's reason. Returns how many."""
    reason = scrub_secrets(
        f"the provider refused the batch ({err.status_code}): {err.message}",
        settings.api_key(),
    )
    now = utcnow()
    with session_scope(settings.database_url) as session:
        ids = session.scalars(
            select(Request.id).where(
                Request.batch_job_id == job_id, Request.status == Status.BATCHED.value
            )
        ).all()
        failed = move_many(session, ids, Status.FAILED, from_=[Status.BATCHED], error=reason)
        move_job(
            session,
            job_id,
            BatchStatus.FAILED,
            from_=[BatchStatus.PREPARING],
            errors={"object": "list", "data": [{"code": "submit_refused", "message": reason}]},
            finished_at=now,
            ingested_at=now,
            updated_at=now,
        )
    log.error("job %s: %s; %d requests failed", job_id, reason, failed)
    return failed


def submit_job(
    settings: Settings, job_id: str, *, crash_after: str | None = None, fresh: bool
) -> tuple[JobReport, int] | None:
    """Bring one `preparing` job (whose lock the caller holds) to a created provider batch.
    Returns (report, requests failed as unwritable), or None when the job is not preparing."""
    with session_scope(settings.database_url) as session:
        job = session.get(BatchJob, job_id)
        if job is None or job.status != BatchStatus.PREPARING:
            return None
        model, input_file_id, created_at = job.model, job.input_file_id, job.created_at
        recorded_provider, recorded_mode = job.provider, job.mode
    if input_file_id is None:
        # Nothing sent to a provider yet: the model's provider and its mode decide the route.
        provider = load_providers(settings).for_model(model)
        mode = resolve_batch_mode(provider, settings)
        if (provider.name, mode) != (recorded_provider, recorded_mode):
            update_job(settings, job_id, provider=provider.name, mode=mode)
    else:
        provider, mode = provider_of(settings, recorded_provider, model), recorded_mode
    if mode == EMULATED:
        discount = provider_batch_discount(provider.batch_discount, mode)
        sent = submit_emulated(settings, job_id, model, discount)
        return JobReport(job_id, model, sent.lines, sent.bytes, None), sent.failed
    client = client_for(provider)
    if not fresh:
        found = find_provider_batch(client, job_id, created_at)
        if found is not None:
            record_batch(settings, job_id, found)
            log.info("job %s: adopted provider batch %s", job_id, found.id)
            counts = found.request_counts.total if found.request_counts else 0
            return JobReport(job_id, model, counts, 0, found.id, adopted=True), 0
    failed = 0
    lines = size = 0
    if input_file_id is None:
        input_file_id, lines, size, failed = _write_and_upload(
            settings, client, job_id, model, crash_after
        )
        if input_file_id is None:
            return JobReport(job_id, model, 0, 0, None), failed
    try:
        batch = create_batch(client, job_id, input_file_id)
    except openai.NotFoundError:
        # The uploaded file is gone at the provider (deleted, expired): upload it again.
        update_job(settings, job_id, input_file_id=None)
        input_file_id, lines, size, more = _write_and_upload(
            settings, client, job_id, model, crash_after
        )
        failed += more
        if input_file_id is None:
            return JobReport(job_id, model, 0, 0, None), failed
        batch = create_batch(client, job_id, input_file_id)
    crash_point(crash_after, "create")
    if not record_batch(settings, job_id, batch):
        cancel_duplicate(client, job_id, batch.id)
        return None
    log.info("job %s: %d lines of %s submitted as %s", job_id, lines, model, batch.id)
    return JobReport(job_id, model, lines, size, batch.id), failed


def _write_and_upload(
    settings: Settings, client: openai.OpenAI, job_id: str, model: str, crash_after: str | None
) -> tuple[str | None, int, int, int]:
    """(input file id or None when no line could be written, lines, bytes, failed)."""
    with session_scope(settings.database_url) as session:
        written = write_job_file(
            session, job_id, model, settings.batch_workdir, settings.batch_max_bytes
        )
    if written.rejected:
        with session_scope(settings.database_url) as session:
            move_each(
                session,
                [{"id": rid, "error": reason} for rid, reason in written.rejected],
                Status.FAILED,
                from_=[Status.BATCHED],
            )
        log.warning("job %s: %d request(s) could not be written", job_id, len(written.rejected))
    if written.lines == 0:
        mark_empty(settings, job_id)
        written.path.unlink(missing_ok=True)
        return None, 0, 0, len(written.rejected)
    crash_point(crash_after, "write")
    with written.path.open("rb") as handle:
        uploaded = client.files.create(file=(written.path.name, handle), purpose="batch")
    crash_point(crash_after, "upload")
    update_job(
        settings,
        job_id,
        input_file_id=uploaded.id,
        request_count=written.lines,
        input_bytes=written.bytes,
    )
    return uploaded.id, written.lines, written.bytes, len(written.rejected)


def _escalate(settings: Settings, request_ids: list[str], flex: Collection[str] = ()) -> None:
    """Send escalated requests to the stream queue (their rows already say route stream and
    their lane; `flex` the ones on the flex lane)."""
    if not request_ids:
        return
    app = celery_for(settings)
    with app.producer_or_acquire() as producer:
        for rid in request_ids:
            lane = "flex" if rid in flex else "stream"
            send_stream(app, rid, why="escalated", producer=producer, lane=lane)
    log.info(
        "escalated %d request(s) to the stream path: deadline before the batch window",
        len(request_ids),
    )
