"""The beat schedule: every periodic task Sheepdog runs, with its interval from settings."""

from __future__ import annotations

from typing import Any

from core.settings import Settings


def cron_schedule(expr: str) -> Any:
    """A Celery crontab from a five-field cron expression (minute hour day month weekday)."""
    from celery.schedules import crontab

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"cron expression {expr!r} needs 5 fields: minute hour day month weekday")
    minute, hour, day, month, weekday = fields
    return crontab(
        minute=minute, hour=hour, day_of_month=day, month_of_year=month, day_of_week=weekday
    )


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Entries for Celery beat. Each task is safe to run twice (beat may double-fire)."""
    schedule: dict[str, dict[str, Any]] = {}
    schedule["janitor"] = {
        "task": "sheepdog.janitor",
        "schedule": settings.janitor_interval_s,
        "options": {"queue": "default", "expires": settings.janitor_interval_s},
    }
    # Batch path: a late tick expires instead of piling up behind a stopped worker.
    schedule["batch-flush"] = {
        "task": "sheepdog.batch.flush",
        "schedule": settings.batch_flush_interval_s,
        "options": {"expires": max(settings.batch_flush_interval_s, 1.0)},
    }
    schedule["batch-poll"] = {
        "task": "sheepdog.batch.poll",
        "schedule": settings.batch_poll_interval_s,
        "options": {"expires": max(settings.batch_poll_interval_s, 1.0)},
    }
    schedule["documents-scan"] = {
        "task": "sheepdog.documents.scan",
        "schedule": cron_schedule(settings.documents_cron),
        "options": {"queue": "default", "expires": 3600},
    }
    schedule["costs-release-stale"] = {
        "task": "sheepdog.costs.release_stale",
        "schedule": 900.0,
        "options": {"queue": "default", "expires": 900},
    }
    schedule["webhooks-sweep"] = {
        "task": "sheepdog.webhooks.sweep",
        "schedule": settings.webhook_sweep_interval_s,
        "options": {"queue": "webhooks", "expires": max(settings.webhook_sweep_interval_s, 1.0)},
    }
    return schedule
