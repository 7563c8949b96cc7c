"""Worker signal handlers: fork safety and start-up checks."""

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
)

log = logging.getLogger("sheepdog.worker")


@worker_process_init.connect
def _fresh_connections_after_fork(**_: Any) -> None:
    # A forked child must not reuse the parent's database sockets.
    from core.db import get_engine

    get_engine().dispose(close=False)


@worker_init.connect
def _kick_webhooks_after_commit(**_: Any) -> None:
    # Requests ended in this worker wake the webhook sweep at once (else beat's, seconds later).
    from tasks.webhooks import install_kicker

    install_kicker()


# -- metrics (sheepdog/metrics.py) -----------------------------------------------------------


@worker_init.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    # The main process serves /metrics; prefork children share numbers through a directory.
    from sheepdog import metrics

    prefork = "prefork" in str(getattr(sender, "pool_cls", "")).lower()
    try:
        metrics.start_exporter(prefork=prefork)
    except Exception:  # metrics must never keep a worker from starting
        log.exception("metrics exporter failed to start")


@task_prerun.connect
def _task_started(task_id: str | None = None, **_: Any) -> None:
    from sheepdog import metrics

    metrics.task_started(task_id)


@task_postrun.connect
def _task_finished(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    from sheepdog import metrics

    metrics.task_finished(task_id, getattr(task, "name", "unknown"), state)


@worker_process_shutdown.connect
def _child_exited(pid: int | None = None, **_: Any) -> None:
    from sheepdog import metrics

    metrics.process_exited(pid or os.getpid())
