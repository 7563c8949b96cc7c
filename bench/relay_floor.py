"""The relay's own floor for bench_stream.py: a bare redis-py PUBLISH from another process to
the same kind of pub/sub subscriber the bench uses, at the latency phase's chunk pace. Sheepdog's
per-chunk relay (provider chunk in -> subscriber) cannot be smaller on this box.

Publisher: ``python bench/relay_floor.py REDIS_URL N GAP_S`` (the bench starts it).
"""

from __future__ import annotations

import subprocess
import sys
import time

import orjson
import redis

CHANNEL = "bench:relay-floor"


def publish(url: str, n: int, gap_s: float) -> None:
    """Publish `n` messages stamped with their send time, `gap_s` apart."""
    client = redis.Redis.from_url(url)
    client.ping()
    for i in range(n):
        client.publish(CHANNEL, orjson.dumps({"i": i, "t": time.time()}))
        time.sleep(gap_s)
    client.publish(CHANNEL, b"end")


def measure(url: str, n: int, gap_s: float = 0.005) -> list[float]:
    """Delays (ms) from before PUBLISH in another process to this process's subscriber."""
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    proc = subprocess.Popen([sys.executable, __file__, url, str(n), str(gap_s)])
    delays: list[float] = []
    deadline = time.monotonic() + 30 + n * gap_s
    try:
        while time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=1)
            if msg is None:
                continue
            now = time.time()
            if msg["data"] == b"end":
                break
            delays.append((now - orjson.loads(msg["data"])["t"]) * 1000)
    finally:
        proc.wait(timeout=30)
        pubsub.close()
    return delays


if __name__ == "__main__":
    publish(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
