"""The Celery app every worker, beat and producer shares."""

from __future__ import annotations

from celery import Celery

from core.settings import Settings, get_settings
from workers.config import celery_config


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from `settings` (default: the process's), beat schedule included."""
    settings = settings or get_settings()
    celery = Celery("sheepdog", task_cls="workers.task_base:SheepdogTask")
    celery.config_from_object(celery_config(settings))
    from scheduler.beat import beat_schedule

    celery.conf.beat_schedule = beat_schedule(settings)
    return celery


app = create_app()

_others: dict[tuple[str, str], Celery] = {}


def app_for(settings: Settings) -> Celery:
    """The Celery app that sends to `settings`' broker: the process's own when it matches,
    else one built (once) for that broker and key prefix."""
    key = (settings.redis_url, settings.broker_prefix)
    own = (app.conf.broker_url, app.conf.broker_transport_options.get("global_keyprefix", ""))
    if key == own:
        return app
    if key not in _others:
        _others[key] = create_app(settings)
    return _others[key]


import workers.broker_fix  # noqa: E402  (a worker survives a lost broker)
import workers.signals  # noqa: E402,F401  (connects worker signal handlers)
