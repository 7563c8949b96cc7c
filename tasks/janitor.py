"""Janitor task (queue `default`, on beat every janitor_interval_s): recovers dead streams and
batched requests whose job can no longer end them."""

from __future__ import annotations

from dataclasses import asdict

from batch.orphans import sweep_batched
from core.settings import get_settings
from streaming.janitor import sweep
from workers.app import app


@app.task(name="sheepdog.janitor", acks_late=True)
def janitor() -> dict[str, int | bool]:
    """Requeue streams whose worker stopped heart-beating; resend lost queued streams; take
    back batched rows whose job is gone or already ingested."""
    report: dict[str, int | bool] = asdict(sweep(app=app))
    orphans = sweep_batched(get_settings())
    report["batched_requeued"] = orphans.requeued
    report["batched_failed"] = orphans.failed
    return report
