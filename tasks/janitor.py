"""Janitor task (queue `default`, on beat every janitor_interval_s): recovers dead streams and
batched requests whose job can no longer end them."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery import shared_task

from batch.orphans import sweep_batched
from core.settings import get_settings
from streaming.janitor import sweep
from tasks.task_base import SheepdogTask


@shared_task(base=SheepdogTask, name="sheepdog.janitor", acks_late=True, bind=True)
def janitor(self: Any) -> dict[str, int | bool]:
    """Requeue streams whose worker stopped heart-beating; resend lost queued streams; take
    back batched rows whose job is gone or already ingested."""
    report: dict[str, int | bool] = asdict(sweep(app=self.app))
    orphans = sweep_batched(get_settings())
    report["batched_requeued"] = orphans.requeued
    report["batched_failed"] = orphans.failed
    return report
