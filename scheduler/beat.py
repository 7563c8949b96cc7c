"""The beat schedule: every periodic task Sheepdog runs, with its interval from settings."""

from __future__ import annotations

from typing import Any

from sheepdog.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Entries for Celery beat. Each task is safe to run twice (beat may double-fire)."""
    schedule: dict[str, dict[str, Any]] = {}
    return schedule
