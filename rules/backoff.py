"""Retry delays: exponential, capped, with jitter so the retries of many callers spread out."""

from __future__ import annotations

import random


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before retry `attempt` (counted from 1): the ceiling doubles from
    `base_s` up to `max_s`, and the delay is drawn uniformly from its upper half (half fixed,
    so no retry comes at once; half random)."""
    ceiling = min(max_s, base_s * 2 ** max(attempt - 1, 0))
    return random.uniform(ceiling / 2, ceiling)
