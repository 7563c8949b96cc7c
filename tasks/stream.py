"""Streaming task (queue `stream`): one high/normal-priority request, streamed to its channel
by this worker process's stream engine (streaming/engine.py) while the task waits."""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from streaming.engine_client import get_engine
from streaming.engine_wire import RESENT_ON
from tasks.task_base import SheepdogTask


# The message is the only copy of a new request until its row is claimed: a database or Redis
# that is away must not lose it (a failed task is acknowledged), so it is sent again until it
# is back.
@shared_task(
    base=SheepdogTask,
    name="sheepdog.stream",
    acks_late=True,
    bind=True,
    autoretry_for=RESENT_ON,
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=None,
)
def stream(self: Any, request_id: str, item: dict[str, Any] | None = None) -> str:
    """Stream `request_id` (recording it first when `item`, its intake message, is given).

    Idempotent: the row's queued -> streaming move is the claim, so a redelivered or resent
    message for a request that has ended or is owned by a live worker does nothing."""
    started = time.time()
    # A redelivered or retried message most likely names a request that has run or runs: the
    # engine checks the row before it calls the provider.
    again = bool((self.request.delivery_info or {}).get("redelivered")) or bool(
        self.request.retries
    )
    return get_engine().run(request_id, item, overlap=not again, started=started)
