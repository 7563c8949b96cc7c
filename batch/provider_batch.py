"""A job's batch at the provider: created with the job id in its metadata, found again by it
(a job whose submitter died), recorded on the job row, and cancelled when it duplicates the
batch another process recorded."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import openai

from batch.batch_object import batch_values, status_of
from batch.job_status import KNOWN, move_job_now
from core.settings import Settings
from models.status import BATCH_FINAL, BatchStatus
from models.tables import utcnow

log = logging.getLogger("sheepdog.batch.flush")

METADATA_KEY = "sheepdog_job_id"
LIST_SLACK_S = 600


def cancel_duplicate(client: openai.OpenAI, job_id: str, batch_id: str) -> None:
    """Cancel a batch this process created for a job another process had already submitted
    (this one stalled past its lock's TTL, or Redis lost the lock, while its create was on the
    way, and a repairer found no batch and made one): the provider would run, and bill, the
    job's requests twice, and only one batch is ever ingested."""
    log.warning(
        "job %s: provider batch %s duplicates the job's recorded batch (its lock lapsed while"
        " it was created); cancelling it",
        job_id,
        batch_id,
    )
    try:
        client.batches.cancel(batch_id)
    except openai.OpenAIError as err:
        log.error("job %s: duplicate batch %s not cancelled: %s", job_id, batch_id, err)


def create_batch(client: openai.OpenAI, job_id: str, input_file_id: str) -> Any:
    return client.batches.create(
        input_file_id=input_file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={METADATA_KEY: job_id},
    )


def record_batch(settings: Settings, job_id: str, batch: Any) -> bool:
    """Record the job's provider batch; False when the job was no longer `preparing` (another
    process recorded a batch for it)."""
    read = batch_values(batch)  # each field as the row can hold it
    # An adopted batch may have ended already (its submitter died long enough ago): poll never
    # refreshes a final job, so its result files must be recorded here or the ingest finds none
    # and sends every request to the provider a second time.
    ended: dict[str, Any] = {}
    status = status_of(batch)
    if status in BATCH_FINAL:
        ended = {
            "output_file_id": read["output_file_id"],
            "error_file_id": read["error_file_id"],
            "errors": read.get("errors"),
            "finished_at": utcnow(),
        }
    if status not in KNOWN:  # a relay's own word: the job is open; poll takes it from here
        log.warning("job %s: status %r is not a Batch API status; kept open", job_id, status)
        status = BatchStatus.VALIDATING
    return move_job_now(
        settings,
        job_id,
        status,
        from_=[BatchStatus.PREPARING],
        provider_batch_id=batch.id,
        input_file_id=batch.input_file_id,
        submitted_at=datetime.fromtimestamp(batch.created_at, UTC),
        completed_count=read["completed_count"],
        failed_count=read["failed_count"],
        **ended,
    )


def find_provider_batch(client: openai.OpenAI, job_id: str, created_at: datetime) -> Any | None:
    """The provider batch whose metadata names `job_id`, paging batches.list (newest first)
    back to shortly before the job row was written."""
    oldest = created_at.timestamp() - LIST_SLACK_S
    for batch in client.batches.list(limit=100):
        if (batch.metadata or {}).get(METADATA_KEY) == job_id:
            return batch
        if batch.created_at < oldest:
            return None
    return None
