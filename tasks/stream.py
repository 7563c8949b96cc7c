"""Streaming task (queue `stream`): one high/normal-priority request, streamed to its channel."""

from __future__ import annotations

import gc
from typing import Any

from celery.signals import worker_ready
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import InterfaceError, OperationalError

from core.settings import get_settings
from streaming.runner import run_stream
from streaming.runtime import get_runtime
from streaming.store import Unavailable
from workers.app import app


# The message is the only copy of a new request until its row is claimed: a database or Redis
# that is away must not lose it (a failed task is acknowledged), so it is sent again until it
# is back.
@app.task(
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
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    return run_stream(request_id, item, overlap=not redelivered)


def _start_threads(pool: Any) -> None:
    """Start the threads pool's threads now: made on demand, each of the first burst's tasks
    waited for a thread to be created and scheduled (Thread.start) on the consumer's path from
    BRPOP to the next message, which held up the starts of a burst of 1,000 streams."""
    executor = getattr(pool, "executor", None)
    grow = getattr(executor, "_adjust_thread_count", None)  # ThreadPoolExecutor's own step
    if grow is None:
        return
    # Each call adds one thread up to max_workers while none is idle (fresh threads do not
    # count as idle until they have run a task).
    for _ in range(int(getattr(executor, "_max_workers", 0))):
        grow()


@worker_ready.connect
def _start_runtime(sender: Any = None, **_: Any) -> None:
    # Warm the loop, provider client and cancel listener before the first request pays for
    # them (threads/solo pools share the process; prefork children start theirs on first use).
    try:
        queues = {q.name for q in sender.task_consumer.queues}
        pool = type(sender.pool).__module__
    except AttributeError:
        return
    if "stream" in queues and "prefork" not in pool:
        get_runtime(get_settings())
        _start_threads(sender.pool)
        # Everything imported and warmed so far lives as long as the process: out of the
        # collector's sight, a full collection no longer walks it (a pause of several ms that
        # showed as per-chunk delay).
        gc.freeze()
