"""Intake task (queue `default`): low-priority requests become `queued` rows for the batch path."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from sqlalchemy.exc import OperationalError

from batch.low_count import count_up
from core.db import session_scope
from core.settings import get_settings
from lifecycle.record import parse_items, record_safely, release_keys
from tasks.task_base import SheepdogTask

log = logging.getLogger("sheepdog.tasks.intake")


# A database that is away must not cost the requests this message carries (a failed task is
# acknowledged): the message is sent again, with backoff, until the database is back.
@shared_task(
    base=SheepdogTask,
    name="sheepdog.intake",
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=None,
)
def intake(items: list[dict[str, Any]]) -> int:
    """Record a bulk of validated requests; idempotent (re-delivery inserts nothing twice)."""
    valid, rejects = parse_items(items)
    for _, reason in rejects:
        log.error("dropped intake entry: %s", reason)
    with session_scope() as session:
        recorded = record_safely(session, valid)
    release_keys(get_settings(), recorded.unkeyed)
    queued = recorded.created - len(recorded.failed)
    count_up(get_settings(), queued)  # sends a flush when the queue passes the threshold
    log.info(
        "intake: %d items, %d new rows (%d failed: could not be stored), %d rejected",
        len(items),
        recorded.created,
        len(recorded.failed),
        len(rejects),
    )
    return recorded.created
