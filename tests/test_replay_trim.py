"""A finished stream's replay log is trimmed to a short TTL once the row holds the answer, and a
follower that comes after it expired gets the stored answer from the row."""

from __future__ import annotations

import time
from typing import Any

import redis

from core import keys
from streaming.subscriber import stream_text


def test_replay_log_is_shortened_after_the_end_and_followers_read_the_row(
    stack: Any, stack_client: Any
) -> None:
    stack.start_worker(
        queues="stream", concurrency=20, env={"SHEEPDOG_REPLAY_DONE_TTL_S": "1"}, name="trim"
    )
    settings = stack_client.settings
    r = redis.Redis.from_url(settings.redis_url)
    ids = [
        stack_client.submit(
            {
                "model": "sheepdog-mini",
                "messages": [{"role": "user", "content": f"trim me {i}"}],
                "priority": "high" if i % 2 else "normal",
            }
        )
        for i in range(6)
    ]
    views = [stack_client.result(rid, wait=60) for rid in ids]
    for view in views:
        assert view.status == "succeeded", (view.status, view.error)
    logs = [keys.of(settings).replay_log(rid) for rid in ids]
    deadline = time.monotonic() + 30
    while any(r.exists(key) for key in logs):  # kept 1 s after the end, not replay_ttl_s (1 h)
        assert time.monotonic() < deadline, [r.ttl(key) for key in logs]
        time.sleep(0.2)
    for view in views:
        follower = stream_text(view.id, timeout=10, settings=settings)
        assert "".join(follower) == view.text
        assert follower.result is not None and follower.result.text == view.text
