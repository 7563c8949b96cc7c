"""bench_stream.py's latency run: the same requests one at a time straight through the SDK and
through Sheepdog, timed to the first token and to each chunk, with the floors measured beside."""

from __future__ import annotations

import secrets
import statistics
import time
from typing import Any, cast

import orjson
import redis
from openai import OpenAI

from bench import relay_floor
from bench.bodies import chat_body
from bench.report import pct
from bench.stream_floors import celery_floor
from core import keys
from sheepdog.client import Client
from simulator.server import SimulatorProcess

STAGES = ("task", "loop", "claimed", "text", "put")
MS = 1000


def direct(sim: SimulatorProcess, n: int, tag: str) -> list[list[float]]:
    """Chunk arrival offsets (s) from request start, straight through the SDK."""
    sdk = OpenAI(base_url=sim.base_url, api_key=sim.api_key, max_retries=0)
    runs = []
    for i in range(n):
        t0 = time.perf_counter()
        times = []
        with sdk.chat.completions.with_streaming_response.create(
            **chat_body(i, tag), stream=True, stream_options={"include_usage": True}
        ) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    obj = orjson.loads(line[6:])
                    if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                        times.append(time.perf_counter() - t0)
        runs.append(times)
    sdk.close()
    return runs


def follow(pubsub: Any, t0: float) -> tuple[list[float], list[float]]:
    """Until done or error: each token's offset (s) from t0, and its wall time when seen."""
    times: list[float] = []
    seen: list[float] = []
    while True:
        msg = pubsub.get_message(timeout=10)
        if msg is None:
            continue
        data = orjson.loads(msg["data"])
        if data["type"] == "token":
            seen.append(time.time())
            times.append(time.perf_counter() - t0)
        elif data["type"] in ("done", "error"):
            return times, seen


def read_trace(
    r: redis.Redis,
    client: Client,
    rid: str,
    wall0: float,
    seen: list[float],
    stages: list[dict[str, float]],
    relay: list[float] | None,
) -> None:
    """The stream's stage times (ms after its message was sent) into `stages`, and each chunk's
    relay delay (s: provider chunk in -> seen) into `relay`."""
    trace = cast(dict[bytes, bytes], r.hgetall(keys.of(client.settings).stream_trace(rid)))
    arrivals = orjson.loads(trace.pop(b"arrivals", b"[]"))
    marks = {k.decode(): float(v) for k, v in trace.items()}
    if relay is not None and len(arrivals) == len(seen):
        relay.extend(s - a for s, a in zip(seen, arrivals, strict=True))
    if all(k in marks for k in STAGES):
        first_seen = seen[0] if seen else 0.0
        stages.append(
            {k: (marks[k] - wall0) * 1000 for k in STAGES} | {"seen": (first_seen - wall0) * 1000}
        )


def through_sheepdog(
    client: Client,
    r: redis.Redis,
    n: int,
    tag: str,
    stages: list[dict[str, float]] | None = None,
    relay: list[float] | None = None,
) -> list[list[float]]:
    """Token arrival offsets (s) from submit, seen by a pub/sub subscriber (and, into `stages`,
    each request's stage times relative to its message being sent)."""
    runs = []
    for i in range(n):
        item = client.prepare({**chat_body(i, tag), "priority": "high"})
        pubsub = r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.of(client.settings).stream_channel(item.id))
        pubsub.get_message(timeout=1)  # the subscribe confirmation
        wall0 = time.time()
        t0 = time.perf_counter()
        client._enqueue([item])  # messages, then the row when the producer writes rows
        times, seen = follow(pubsub, t0)
        pubsub.close()
        runs.append(times)
        if stages is not None:
            read_trace(r, client, item.id, wall0, seen, stages, relay)
    return runs


def chunk_delays(base: list[list[float]], other: list[list[float]]) -> list[float]:
    """Each chunk's offset from the first token in `other` minus the same chunk's in `base`."""
    delays = []
    for ra, rb in zip(base, other, strict=True):
        for k in range(1, min(len(ra), len(rb))):
            delays.append((rb[k] - rb[0]) - (ra[k] - ra[0]))
    return delays


def latency(sim: SimulatorProcess, client: Client, r: redis.Redis, n: int) -> dict[str, float]:
    """TTFT and per-chunk delay, direct and through Sheepdog (ms)."""
    sim.configure(ttft_ms=20, chunk_delay_ms=5, answer_tokens=[20, 20])
    tag = secrets.token_hex(3)
    direct(sim, 5, "warm" + tag)
    through_sheepdog(client, r, 5, "warm" + tag)
    a = direct(sim, n, tag)
    stages: list[dict[str, float]] = []
    relay: list[float] = []
    b = through_sheepdog(client, r, n, tag, stages, relay)
    noise = direct(sim, n, tag)  # the same chunks direct again: the metric's own noise floor
    redis_url = client.settings.redis_url
    celery_ms = celery_floor(redis_url).measure(n)  # stock Celery: send -> a no-op task's body
    bare_relay_ms = relay_floor.measure(redis_url, min(n * 20, 2000))  # bare PUBLISH -> subscriber
    added_chunk = chunk_delays(a, b)
    return {
        "celery_floor_p50": pct(celery_ms, 0.5),
        "celery_floor_p99": pct(celery_ms, 0.99),
        **stage_medians(stages),
        **ttft_figures(a, b),
        "added_chunk_p50": pct(added_chunk, 0.5) * MS,
        "added_chunk_p99": pct(added_chunk, 0.99) * MS,
        "noise_chunk_p99": pct(chunk_delays(a, noise), 0.99) * MS,
        "relay_p50": pct(relay, 0.5) * MS,
        "relay_p99": pct(relay, 0.99) * MS,
        "relay_floor_p50": pct(bare_relay_ms, 0.5),
        "relay_floor_p99": pct(bare_relay_ms, 0.99),
    }


def stage_medians(stages: list[dict[str, float]]) -> dict[str, float]:
    """The median of each stage's time over the streams (ms after send)."""

    def stage(key: str) -> float:
        return statistics.median(s[key] for s in stages) if stages else float("nan")

    return {f"at_{key}": stage(key) for key in (*STAGES, "seen")}


def ttft_figures(a: list[list[float]], b: list[list[float]]) -> dict[str, float]:
    """TTFT direct (a) and through Sheepdog (b), and b's added to a's median (ms)."""
    ttft_a = [run[0] for run in a]
    ttft_b = [run[0] for run in b]
    med_a = statistics.median(ttft_a)
    added = [t - med_a for t in ttft_b]
    return {
        "direct_ttft_p50": pct(ttft_a, 0.5) * MS,
        "direct_ttft_p99": pct(ttft_a, 0.99) * MS,
        "sheepdog_ttft_p50": pct(ttft_b, 0.5) * MS,
        "sheepdog_ttft_p99": pct(ttft_b, 0.99) * MS,
        "added_ttft_p50": pct(added, 0.5) * MS,
        "added_ttft_p99": pct(added, 0.99) * MS,
    }
