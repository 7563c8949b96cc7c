"""The shared rate limiter against the real Redis: rates hold across threads and processes."""

from __future__ import annotations

import threading
import time
import uuid

import redis

from core.keys import Keys
from core.ratelimit import RateLimiter, RateLimits

Start = tuple[float, float]  # the call that was let through: sent, answered (monotonic)


def starts_under(
    limiter: RateLimiter, threads: int, seconds: float, tokens: int = 1
) -> list[Start]:
    """Every start let through while `threads` threads ask for `seconds`. A start is when
    Redis ran the script, somewhere inside the bracket of the call that was let through: a
    stamp taken after it returns is late by however long the thread waited for the GIL, which
    on a loaded box moved a start into the next window."""
    starts: list[Start] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run() -> None:
        while time.monotonic() < stop:
            while True:  # RateLimiter.acquire, its successful call bracketed
                sent = time.monotonic()
                wait = limiter.try_acquire(tokens)
                if wait <= 0:
                    break
                time.sleep(wait)
            answered = time.monotonic()
            with lock:
                starts.append((sent, answered))

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return starts


def max_in_window(starts: list[Start], window: float) -> int:
    """The most starts certainly inside one window of `window` seconds (their whole brackets
    in it): never more than the limiter let through, whatever the threads' delays."""
    ordered = sorted(starts)
    return max(
        (
            sum(1 for s, e in ordered[i:] if e <= begin + window)
            for i, (begin, _) in enumerate(ordered)
        ),
        default=0,
    )


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
