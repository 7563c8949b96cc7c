"""Streaming task (queue `stream`): one high/normal-priority request, streamed to its channel
by this worker process's stream engine (streaming/engine.py) while the task waits."""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import InterfaceError, OperationalError

from streaming.engine_client import get_engine
from streaming.store import Unavailable
from tasks.task_base import SheepdogTask


# The message is the only copy of a new request until its row is claimed: a database or Redis
# that is away must not lose it (a failed task is acknowledged), so it is sent again until it
# is back.
@shared_task(
    base=SheepdogTask,
    name="sheepdog.stream",
    acks_late=True,
    bind=True,
    autoretry_for=(
        OperationalError,
        InterfaceError,
        Unavailable,
        RedisConnectionError,
        RedisTimeoutError,
    ),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=None,
)
def stream(self: Any, request_id: str, item: dict[str, Any] | None = None) -> str:
    """Stream `request_id` (recording it first when `item`, its intake message, is given).

    Idempotent: the row's queued -> streaming move is the claim, so a redelivered or resent
    message for a request that has ended or is owned by a live worker does nothing."""
    started = time.time()
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    return get_engine().run(request_id, item, overlap=not redelivered, started=started)
