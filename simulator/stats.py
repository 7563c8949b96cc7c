"""Counters and the arrival log served by ``GET /_sim/stats``."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

LOG_LIMIT = 200_000


class Stats:
    """What the simulator has seen since start or the last reset."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.chat_log: deque[tuple[float, str, bool, object]] = deque(maxlen=LOG_LIMIT)
        self.started_at = time.time()

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def log_chat(self, model: str, stream: bool, max_tokens: object = None) -> None:
        """Record the arrival of a chat-completion request (for rate measurements) and the
        output limit it asked for, as sent."""
        self.chat_log.append((time.time(), model, stream, max_tokens))

    def to_json(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "counters": dict(self.counters),
            "chat_requests": [
                {"t": t, "model": m, "stream": s, "max_tokens": n} for t, m, s, n in self.chat_log
            ],
        }
