"""Worker signal handlers: fork safety, start-up warm-up, metrics, webhook kicks.

Connected by `connect()` when a worker, beat or Flower builds its app (workers/app.py), never at
import: a host process that imports Sheepdog's code keeps its own signals to itself."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import (
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from core.heap import freeze_startup_heap

log = logging.getLogger("sheepdog.worker")


def connect() -> None:
    """Connect every handler below (once per process: Celery keeps them by identity)."""
    worker_process_init.connect(_fresh_connections_after_fork, weak=False)
    worker_init.connect(_kick_webhooks_after_commit, weak=False)
    worker_init.connect(_serve_metrics, weak=False)
    worker_ready.connect(_start_stream_runtime, weak=False)
    task_prerun.connect(_task_started, weak=False)
    task_postrun.connect(_task_finished, weak=False)
    worker_process_shutdown.connect(_child_exited, weak=False)


def _fresh_connections_after_fork(**_: Any) -> None:
    # A forked child must not reuse the parent's database sockets.
    from core.db import get_engine

    get_engine().dispose(close=False)


def _kick_webhooks_after_commit(**_: Any) -> None:
    # Requests ended in this worker wake the webhook sweep at once (else beat's, seconds later).
    from tasks.webhooks import install_kicker

    install_kicker()


def _start_stream_runtime(sender: Any = None, **_: Any) -> None:
    # Start the stream engine (its loop, provider clients and cancel listener warm) before the
    # first request pays for it (threads/solo pools share the process; prefork children start
    # theirs on first use).
    from streaming.engine_client import get_engine

    try:
        queues = {q.name for q in sender.task_consumer.queues}
        pool = type(sender.pool).__module__
    except AttributeError:
        return
    if "stream" in queues and "prefork" not in pool:
        get_engine().start()
        _start_threads(sender.pool)
        freeze_startup_heap()


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


# -- metrics (workers/metrics.py) -----------------------------------------------------------


def _serve_metrics(sender: Any = None, **_: Any) -> None:
    # The main process serves /metrics; prefork children share numbers through a directory.
    from workers import metrics

    prefork = "prefork" in str(getattr(sender, "pool_cls", "")).lower()
    try:
        metrics.start_exporter(prefork=prefork)
    except Exception:  # metrics must never keep a worker from starting
        log.exception("metrics exporter failed to start")


def _task_started(task_id: str | None = None, **_: Any) -> None:
    from workers import metrics

    metrics.task_started(task_id)


def _task_finished(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    from workers import metrics

    metrics.task_finished(task_id, getattr(task, "name", "unknown"), state)


def _child_exited(pid: int | None = None, **_: Any) -> None:
    from workers import metrics

    metrics.process_exited(pid or os.getpid())
