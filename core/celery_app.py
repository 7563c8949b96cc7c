"""The Celery app a process sends with, and the configuration every Sheepdog app shares: JSON
only, explicit queues and routes, late acks, events on.

`celery_for(settings)` builds an app on its first call (never at import) that registers no task,
connects no signal and is not made the process's current app, so a host process that is itself
a Celery app is left alone. A worker, beat or Flower builds its own on start (workers/app.py)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from core import broker_fix
from core.settings import Settings

QUEUES = ("stream", "default", "batch", "webhooks")

# Task names (../shared/DESIGN.md): what producers send and tasks/ registers.
STREAM_TASK = "sheepdog.stream"
INTAKE_TASK = "sheepdog.intake"
FLUSH_TASK = "sheepdog.batch.flush"
EMULATE_TASK = "sheepdog.batch.emulate"


def route_task(name: str, *_: Any, **__: Any) -> dict[str, str]:
    """stream tasks to `stream`, batch tasks to `batch`, webhook deliveries to `webhooks`, the
    rest (intake, bookkeeping) to `default`."""
    if name == "sheepdog.stream" or name.startswith("sheepdog.stream."):
        return {"queue": "stream"}
    if name.startswith("sheepdog.batch."):
        return {"queue": "batch"}
    if name.startswith("sheepdog.webhooks."):  # a slow receiver never holds up other work
        return {"queue": "webhooks"}
    return {"queue": "default"}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings for `settings`."""
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            # Long enough that a running stream is never re-delivered; dead workers are found
            # by the heartbeat janitor instead (see tasks/janitor.py).
            "visibility_timeout": 6 * 3600,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            # No retry_on_timeout: a timed-out command replayed may land twice, so kombu will
            # not pipeline publishes with it on (Producer.batch, which a burst of stream
            # messages uses); Celery's publish retry policy retries lost connections.
            "health_check_interval": 25,
            **({"global_keyprefix": settings.broker_prefix} if settings.broker_prefix else {}),
        },
        "broker_pool_limit": 50,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,
        "task_queues": [Queue(q, routing_key=q) for q in QUEUES],
        "task_default_queue": "default",
        "task_routes": (route_task,),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
    }


_apps: dict[tuple[str, str], Celery] = {}


def celery_for(settings: Settings) -> Celery:
    """The process's Celery app for `settings`' broker (URL and key prefix), built once."""
    key = (settings.redis_url, settings.broker_prefix)
    app = _apps.get(key)
    if app is None:
        broker_fix.install()  # a publish survives a lost broker; one redis client per channel
        app = Celery("sheepdog", set_as_current=False)
        app.config_from_object(celery_config(settings))
        app = _apps.setdefault(key, app)
    return app
