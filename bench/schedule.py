"""Calls made on a schedule, as a steady load makes them."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable


def on_schedule(n: int, rate: float, call: Callable[[int], None], senders: int = 8) -> float:
    """`call(i)` for i < n, each at its time (`rate` a second from half a second on), from
    `senders` threads; the rate achieved."""
    start = time.perf_counter() + 0.5

    def one(i: int) -> None:
        time.sleep(max(0.0, start + i / rate - time.perf_counter()))
        call(i)

    with concurrent.futures.ThreadPoolExecutor(senders) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - start)
