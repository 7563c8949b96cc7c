"""Cost bookkeeping task (queue `default`): free reservations nobody will settle."""

from __future__ import annotations

import logging

from celery import shared_task

from core.db import session_scope
from costs.reservations import release_stale
from tasks.task_base import SheepdogTask

log = logging.getLogger("sheepdog.tasks.costs")


@shared_task(base=SheepdogTask, name="sheepdog.costs.release_stale", acks_late=True)
def release_stale_reservations() -> int:
    """Release reservations held over an hour whose request never arrived or already ended.
    Idempotent: a released reservation is not held any more."""
    with session_scope() as session:
        released = release_stale(session)
    if released:
        log.info("released %d stale budget reservations", released)
    return released
