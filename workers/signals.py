"""Worker signal handlers: fork safety and start-up checks."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init

log = logging.getLogger("sheepdog.worker")


@worker_process_init.connect
def _fresh_connections_after_fork(**_: Any) -> None:
    # A forked child must not reuse the parent's database sockets.
    from sheepdog.db import get_engine

    get_engine().dispose(close=False)
