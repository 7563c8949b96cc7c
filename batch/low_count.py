"""The count of queued low-priority requests that triggers a flush before its interval: raised
by each intake, lowered by each flush. Kept apart from the flush itself, so the producer's
record path counts without importing the provider SDK."""

from __future__ import annotations

import logging

from core import keys
from core.celery_app import FLUSH_TASK, celery_for
from core.redis_conn import get_redis
from core.settings import Settings

log = logging.getLogger("sheepdog.batch.flush")


def count_down(settings: Settings, n: int) -> None:
    """Lower the queued-low counter the intake threshold trigger reads (never below 0)."""
    if n <= 0:
        return
    r = get_redis(settings.redis_url)
    counter = keys.of(settings).queued_low_count
    if int(r.decrby(counter, n)) < 0:
        r.set(counter, 0)


def count_up(settings: Settings, n: int) -> bool:
    """Add `n` newly queued low-priority requests to the counter; True (and a flush sent to the
    batch queue) each time the count passes another multiple of batch_flush_threshold. One
    Redis INCRBY: cheap enough for every intake message."""
    if n <= 0 or settings.batch_flush_threshold <= 0:
        return False
    total = int(get_redis(settings.redis_url).incrby(keys.of(settings).queued_low_count, n))
    step = settings.batch_flush_threshold
    if total // step <= (total - n) // step:
        return False
    celery_for(settings).send_task(FLUSH_TASK, kwargs={"reason": "threshold"})
    log.info("queued low-priority requests passed %d: flush sent", total // step * step)
    return True
