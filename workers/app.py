"""The Celery app of a worker, beat or Flower: built when one starts, never at import.

`worker_app()` takes the process's app for its broker (core/celery_app.py, the one every path
sends with), gives it what only a worker needs (the task modules, the beat schedule, the signal
handlers) and makes it the process's current app. `celery -A workers.app`
finds it as the module's `app`, built on that first look."""

from __future__ import annotations

from typing import Any

from celery import Celery

from core.celery_app import celery_for
from core.settings import Settings, get_settings

# Every module that defines tasks; the worker imports them at start.
TASK_MODULES = [
    "tasks.intake",
    "tasks.costs",
    "tasks.stream",
    "tasks.batch",
    "tasks.documents",
    "tasks.janitor",
    "tasks.webhooks",
]


def worker_app(settings: Settings | None = None) -> Celery:
    """The app a worker, beat or Flower runs, for `settings` (default: the process's)."""
    from scheduler.beat import beat_schedule
    from workers import signals

    settings = settings or get_settings()
    app = celery_for(settings)
    if not app.conf.get("sheepdog_worker"):
        app.conf.update(
            imports=TASK_MODULES,
            beat_schedule=beat_schedule(settings),
            sheepdog_worker=True,
        )
        signals.connect()
    app.set_current()
    return app


def __getattr__(name: str) -> Any:
    # `celery -A workers.app …` (the compose health check, the tests' workers) reads `app`.
    if name == "app":
        return worker_app()
    raise AttributeError(name)
