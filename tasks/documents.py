"""The nightly documents task (queue `default`): scan and enqueue new or changed documents."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from tasks.task_base import SheepdogTask

log = logging.getLogger("sheepdog.tasks.documents")


@shared_task(base=SheepdogTask, name="sheepdog.documents.scan", acks_late=True)
def scan() -> dict[str, Any]:
    """Run the documents scan (safe to run twice: one at a time, idempotency keys per part)."""
    from documents.scan import scan_documents

    report = scan_documents()
    if report.error and not report.skipped:
        log.error("documents scan: %s", report.error)
    return {k: v for k, v in report.as_dict().items() if k != "items"}
