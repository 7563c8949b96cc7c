"""Webhook delivery tasks (queue `webhooks`): beat's sweep, and one delivery run per endpoint
(or request-level URL) and tenant.

The sweep is also kicked right after a commit that wrote deliveries (at most once per
KICK_WINDOW_S per deployment), so an event usually leaves within a fraction of a second."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery import shared_task

from core import keys
from core.settings import get_settings
from tasks.task_base import SheepdogTask
from webhooks import outbox
from webhooks.delivery import deliver_target, due_targets

KICK_WINDOW_S = 0.05


@shared_task(base=SheepdogTask, name="sheepdog.webhooks.sweep", acks_late=True)
def sweep() -> int:
    """Send one delivery task per target and tenant with due deliveries (each exits at once
    when the tenant's or the target's slots are all busy). Safe to run twice: deliveries are
    leased."""
    settings = get_settings()
    targets = due_targets(settings)
    expires = max(settings.webhook_sweep_interval_s * 5, 10.0)
    for target, tenant in targets:
        deliver.apply_async((target, tenant), expires=expires)
    return len(targets)


@shared_task(base=SheepdogTask, name="sheepdog.webhooks.deliver", acks_late=True)
def deliver(target: str, tenant: str | None = None) -> dict[str, Any]:
    """Deliver a target's due rows of one tenant (webhooks/delivery.py); a message sent
    before tenants had slots names no tenant, and delivers every tenant's."""
    report = asdict(deliver_target(get_settings(), target, tenant))
    report.pop("outcomes", None)
    return report


def kick() -> None:
    """Ask for a sweep soon: the first kick of a window schedules one at its end, so every
    commit made before then is seen; later kicks in the window add nothing."""
    from core.redis_conn import get_redis

    settings = get_settings()
    window_ms = int(KICK_WINDOW_S * 1000)
    if get_redis(settings.redis_url).set(keys.of(settings).webhook_kick, 1, nx=True, px=window_ms):
        sweep.apply_async(countdown=KICK_WINDOW_S, expires=60)


def install_kicker() -> None:
    """Called on worker start (workers/signals.py): commits in this process kick a sweep."""
    outbox.set_kicker(kick)
