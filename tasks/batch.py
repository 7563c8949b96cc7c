"""Batch-path tasks (queue `batch`), thin: each calls a plain function in batch/.

All four are safe to run twice at once (beat may double-fire, a message may be re-delivered):
the claim is atomic, submits and ingests hold a per-job lock, and every write is conditional.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from batch.emulated_executor import emulate as run_emulate
from batch.flush import flush as run_flush
from batch.ingest import ingest as run_ingest
from batch.poll import poll as run_poll
from tasks.task_base import SheepdogTask

log = logging.getLogger("sheepdog.tasks.batch")


@shared_task(base=SheepdogTask, name="sheepdog.batch.flush", acks_late=True)
def flush(reason: str = "beat") -> dict[str, Any]:
    """Claim queued low-priority requests and submit them as provider batches."""
    report = run_flush()
    return {"reason": reason, "claimed": report.claimed, "jobs": [j.job_id for j in report.jobs]}


@shared_task(base=SheepdogTask, name="sheepdog.batch.poll", acks_late=True)
def poll() -> dict[str, Any]:
    """Refresh open jobs; send an ingest for each job whose results are ready."""
    report = run_poll()
    for job_id in report.to_ingest:
        ingest.apply_async(args=[job_id])
    return {"checked": report.checked, "ingest": report.to_ingest}


@shared_task(base=SheepdogTask, name="sheepdog.batch.ingest", acks_late=True)
def ingest(job_id: str) -> dict[str, Any]:
    """Write a final job's results into its requests (re-runnable after a crash)."""
    report = run_ingest(job_id)
    if report.skipped:
        log.info("ingest %s skipped: %s", job_id, report.skipped)
    return {
        "job_id": job_id,
        "succeeded": report.succeeded,
        "failed": report.failed,
        "requeued": report.requeued,
        "skipped": report.skipped,
    }


@shared_task(base=SheepdogTask, name="sheepdog.batch.emulate", acks_late=True)
def emulate(job_id: str) -> dict[str, Any]:
    """Run an emulated job's lines (provider without a Batch API); ingest it when it ends.
    A second message for a job a live executor holds returns at once (`busy`)."""
    report = run_emulate(job_id)
    if report.outcome in ("completed", "cancelled"):
        ingest.apply_async(args=[job_id])
    return {
        "job_id": job_id,
        "outcome": report.outcome,
        "calls": report.calls,
        "written": report.written,
    }
