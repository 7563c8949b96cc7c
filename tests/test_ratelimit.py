"""The shared rate limiter against the real Redis: rates hold across threads and processes."""

from __future__ import annotations

import threading
import time
import uuid

import redis

from core.keys import Keys
from core.ratelimit import RateLimiter, RateLimits


def starts_under(
    limiter: RateLimiter, threads: int, seconds: float, tokens: int = 1
) -> list[float]:
    stamps: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run() -> None:
        while time.monotonic() < stop:
            limiter.acquire(tokens)
            with lock:
                stamps.append(time.monotonic())

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return stamps


def max_in_window(stamps: list[float], window: float) -> int:
    stamps = sorted(stamps)
    best, j = 0, 0
    for i, s in enumerate(stamps):
        while stamps[j] < s - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_requests_per_minute_is_never_exceeded(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    rates = RateLimits(1200, None)  # 20/s
    limiter = RateLimiter(client, f"p-{uuid.uuid4().hex[:6]}", rates, Keys())
    stamps = starts_under(limiter, threads=8, seconds=1.5)
    # any 1-second window: at most 20 + 1 starts
    assert max_in_window(stamps, 1.0) <= 21
    assert len(stamps) >= 25  # and the limiter does let work through


def test_tokens_per_minute(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    limiter = RateLimiter(
        client, f"p-{uuid.uuid4().hex[:6]}", RateLimits(None, 60_000), Keys()
    )  # 1,000/s
    stamps = starts_under(limiter, threads=4, seconds=1.2, tokens=100)  # => 10 requests/s
    assert max_in_window(stamps, 1.0) <= 11


def test_penalize_holds_every_caller(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    name = f"p-{uuid.uuid4().hex[:6]}"
    limiter = RateLimiter(client, name, RateLimits(6000, None), Keys())
    other = RateLimiter(redis.Redis.from_url(redis_url), name, RateLimits(6000, None), Keys())
    assert limiter.try_acquire(1) == 0
    limiter.penalize(0.5)
    wait = other.try_acquire(1)
    assert 0.3 < wait <= 0.5
