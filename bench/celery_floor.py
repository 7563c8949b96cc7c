"""Celery's own floor for bench_stream.py: a stock Celery worker (Sheepdog's Celery settings,
threads pool, events on, none of Sheepdog's code or fixes) running a no-op task that records
how long after its send it started. Sheepdog's added time to first token cannot be smaller.

Worker: ``python -m celery -A bench.celery_floor worker -Q floor -P threads -c 100``
(cwd: the repository root; SHEEPDOG_REDIS_URL names the broker).
"""

from __future__ import annotations

import time

import redis
from celery import Celery
from kombu import Queue

from bench.schedule import on_schedule
from core.celery_app import celery_config
from core.settings import Settings

QUEUE = "floor"
RESULTS = "bench:celery-floor"

settings = Settings()
app = Celery("celery-floor")
app.conf.update(
    {
        **celery_config(settings),
        "imports": [],
        "task_queues": [Queue(QUEUE, routing_key=QUEUE)],
        "task_default_queue": QUEUE,
        "task_routes": None,
    }
)
_redis = redis.Redis.from_url(settings.redis_url)


@app.task(name="bench.floor")
def floor(sent: float) -> None:
    """Record the delay from send to this task's body (seconds)."""
    _redis.rpush(RESULTS, time.time() - sent)


def measure(n: int, gap_s: float = 0.02) -> list[float]:
    """Send `n` no-op tasks one at a time; their delays (ms) from before apply_async to start."""
    _redis.delete(RESULTS)
    for _ in range(n):
        floor.apply_async(args=[time.time()])
        time.sleep(gap_s)
    return _collect(n, timeout_s=30)


def measure_at_rate(rate: float, seconds: float) -> list[float]:
    """Send no-op tasks on a schedule of `rate` a second for `seconds`, one apply_async each
    (as the steady load sends its streams); their delays (ms) from before the send to the
    body."""
    _redis.delete(RESULTS)
    n = int(rate * seconds)
    on_schedule(n, rate, lambda _: floor.apply_async(args=[time.time()]))
    return _collect(n, timeout_s=60)


def measure_burst(n: int) -> list[float]:
    """Send `n` no-op tasks in one pipeline (as Sheepdog's client sends a burst); each one's
    delay (ms) from the start of the send to its body: how fast stock Celery starts a burst."""
    _redis.delete(RESULTS)
    t0 = time.time()
    with app.producer_or_acquire() as producer, producer.batch():
        for _ in range(n):
            floor.apply_async(args=[t0], producer=producer)
    return _collect(n, timeout_s=120)


def _collect(n: int, timeout_s: float) -> list[float]:
    """The delays (ms) the tasks recorded, once `n` are in (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while _redis.llen(RESULTS) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return [float(v) * 1000 for v in _redis.lrange(RESULTS, 0, -1)]
