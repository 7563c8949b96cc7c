"""Janitor task (queue `default`, on beat every janitor_interval_s): recovers dead streams."""

from __future__ import annotations

from dataclasses import asdict

from streaming.janitor import sweep
from workers.app import app


@app.task(name="sheepdog.janitor", acks_late=True)
def janitor() -> dict[str, int | bool]:
    """Requeue streams whose worker stopped heart-beating; resend lost queued streams."""
    return asdict(sweep(app=app))
