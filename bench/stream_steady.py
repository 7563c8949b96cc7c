"""bench_stream.py's steady-load run: new streams arriving at a steady rate (200/s for 60 s,
each 50 chunks 100 ms apart, so ~1,000 open at once), straight through the async SDK and then
through Sheepdog, each one's time to first token against the same load served directly.

Direct: one asyncio client (aiohttp on uvloop: the SDK's own path costs too much CPU a chunk for
one process to read 10,000 chunks a second on this box and still start streams on time)
starting each stream on schedule with the SDK's request and reading it to the end; its TTFT is
request start -> first content chunk. Through Sheepdog: each request submitted on schedule, one
per call, from a pool of sender threads (the producer writes each row, the default); its TTFT
is the send -> the row's first token (the worker's, just before it is published: the relay adds
its ~0.3 ms, measured by the latency run). The queue: the stream queue's length, sampled every
second while the requests arrive; bounded when its last ten seconds are no longer than its
first ten. Worker CPU per chunk: the stream worker and its engine over the Sheepdog run.
Celery's floor under the load: stock Celery no-op tasks sent at the same rate while the
simulator serves the same streams directly once more (floor_under_load)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import statistics
import threading
import time
from typing import Any

import aiohttp
import orjson
import redis
import uvloop

from bench.bodies import chat_body
from bench.cpu import CpuWindow, Groups, GroupWindow, named, process_tree
from bench.report import pct
from bench.schedule import on_schedule
from bench.stream_burst import TOKENS, ended_rows, start_pyspy
from bench.stream_floors import celery_floor
from bench.stream_latency import STAGES
from core import keys
from sheepdog.client import Client
from simulator.server import SimulatorProcess

MS = 1000


def direct(sim: SimulatorProcess, rate: float, seconds: float, tag: str) -> list[float]:
    """Each stream's TTFT (s), started on schedule straight through the async SDK."""

    url = f"{sim.base_url.rstrip('/')}/chat/completions"
    headers = {"Authorization": f"Bearer {sim.api_key}", "Content-Type": "application/json"}

    async def one(http: aiohttp.ClientSession, i: int, at: float) -> float:
        body = orjson.dumps({**chat_body(i, tag), "stream": True})
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        t0 = time.perf_counter()
        first = float("nan")
        async with http.post(url, data=body, headers=headers) as resp:
            async for data in resp.content.iter_any():
                if first != first and b'"content":"' in data:
                    first = time.perf_counter() - t0
        return first

    async def run() -> list[float]:
        connector = aiohttp.TCPConnector(limit=4000)
        async with aiohttp.ClientSession(connector=connector) as http:
            start = time.perf_counter() + 0.5
            n = int(rate * seconds)
            return await asyncio.gather(*(one(http, i, start + i / rate) for i in range(n)))

    return uvloop.run(run())


def floor_under_load(
    sim: SimulatorProcess, client: Client, rate: float, seconds: float, tag: str
) -> list[float]:
    """Celery's own floor under this load: delays (ms) of stock Celery no-op tasks sent at
    `rate` (bench/celery_floor.py's worker) while the simulator serves the same streams
    directly again and one client reads every chunk. A design with a Celery hop that reads
    the provider's stream on this box starts a stream no sooner."""
    floor = celery_floor(client.settings.redis_url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        delays = pool.submit(floor.measure_at_rate, rate, seconds)
        direct(sim, rate, seconds, tag)
        return delays.result()


def queue_length(r: redis.Redis) -> int:
    """Messages waiting in the stream queue (kombu keeps one list per priority step)."""
    total = 0
    for key in r.scan_iter(match="stream*", count=100):
        if r.type(key) == b"list":
            total += int(r.llen(key))
    return total


SENDERS = 8  # threads submitting on schedule (each submit writes its row: a few ms)


def through_sheepdog(
    client: Client, r: redis.Redis, db_url: str, rate: float, seconds: float, tag: str
) -> tuple[list[float], list[int], float, dict[str, float]]:
    """(each stream's TTFT in s, the queue length each second, the rate achieved, the trace
    stages' medians)."""
    n = int(rate * seconds)
    items = [client.prepare({**chat_body(i, tag), "priority": "normal"}) for i in range(n)]
    sent: dict[str, float] = {}
    lengths: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        probe = redis.Redis(connection_pool=r.connection_pool)
        while not stop.wait(1.0):
            lengths.append(queue_length(probe))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wall0 = time.time() - time.perf_counter()  # perf_counter -> wall clock

    def send(i: int) -> None:
        sent[items[i].id] = wall0 + time.perf_counter()
        client._enqueue([items[i]])

    achieved = on_schedule(n, rate, send, SENDERS)
    stop.set()  # the queue while they arrive
    sampler.join()
    rows = ended_rows(db_url, list(sent), timeout_s=180)
    stages = stage_times(r, client, sent)
    ttft = [
        row.first_token_at.timestamp() - sent[row.id]
        for row in rows
        if row.first_token_at is not None and row.status == "succeeded"
    ]
    missing = n - len(ttft)
    if missing:
        print(f"steady: {missing} of {n} streams did not succeed", flush=True)
    return ttft, lengths, achieved, stages


def stage_times(r: redis.Redis, client: Client, sent: dict[str, float]) -> dict[str, float]:
    """Each trace stage's median (ms after the send) over the streams that recorded them all
    (the worker's SHEEPDOG_STREAM_TRACE marks: where a steady load's added TTFT goes)."""
    names = keys.of(client.settings)
    ids = list(sent)
    with r.pipeline(transaction=False) as pipe:
        for rid in ids:
            pipe.hmget(names.stream_trace(rid), list(STAGES))
        traces = pipe.execute()
    per_stage: dict[str, list[float]] = {k: [] for k in STAGES}
    for rid, values in zip(ids, traces, strict=True):
        if all(values):
            for key, value in zip(STAGES, values, strict=True):
                per_stage[key].append((float(value) - sent[rid]) * MS)
    return {f"steady_at_{k}": statistics.median(v) for k, v in per_stage.items() if v}


def sheepdog_groups(workers: list[int], sim_pid: int) -> Groups:
    """Whose CPU a stream through Sheepdog costs: this process (the producer's sender
    threads), the stream workers' consumers, their engines, PostgreSQL's and Redis's server
    processes (the box runs nothing else meanwhile), the simulator."""

    def engines() -> list[int]:
        return [p for w in workers for p in process_tree(w) if p != w]

    return {
        "producer": lambda: [os.getpid()],
        "consumer": lambda: list(workers),
        "engine": engines,
        "postgres": lambda: named("postgres"),
        "redis": lambda: named("redis-server"),
        "simulator": lambda: [sim_pid],
    }


def steady(
    sim: SimulatorProcess,
    client: Client,
    r: redis.Redis,
    db_url: str,
    rate: float,
    seconds: float,
    workers: list[int],
) -> dict[str, float]:
    """The steady-load run: added TTFT over the same load served directly, and the queue."""
    sim.configure(ttft_ms=20, chunk_delay_ms=100, answer_tokens=[TOKENS, TOKENS])
    tag = secrets.token_hex(3)
    assert sim.process is not None
    sim_pid = sim.process.pid
    direct_cpu = GroupWindow({"client": lambda: [os.getpid()], "simulator": lambda: [sim_pid]})
    base = direct(sim, rate, seconds, "direct" + tag)
    direct_used = direct_cpu.read()
    floor = floor_under_load(sim, client, rate, seconds, "floor" + tag)
    procs = [p for w in workers for p in process_tree(w)]
    box = CpuWindow([])  # the box's busy share
    by_group = GroupWindow(sheepdog_groups(workers, sim_pid))
    spy = start_pyspy(procs[0] if os.environ.get("BENCH_PYSPY_WORKER") else procs[-1])
    ttft, lengths, achieved, stages = through_sheepdog(
        client, r, db_url, rate, seconds, "steady" + tag
    )
    _, busy = box.read()
    group_used = by_group.read()
    worker_s = group_used["consumer"] + group_used["engine"]  # the stream workers' CPU
    if spy is not None:
        spy.wait()
    first, last = lengths[:10] or [0], lengths[-10:] or [0]
    out: dict[str, Any] = {
        "steady_rate": achieved,
        "steady_direct_p50": pct(base, 0.5) * MS,
        "steady_direct_p99": pct(base, 0.99) * MS,
        "steady_floor_p50": pct(floor, 0.5),
        "steady_floor_p99": pct(floor, 0.99),
        "steady_p50": pct(ttft, 0.5) * MS,
        "steady_p99": pct(ttft, 0.99) * MS,
        "steady_queue_max": float(max(lengths or [0])),
        "steady_queue_first10": sum(first) / len(first),
        "steady_queue_last10": sum(last) / len(last),
        "steady_done": float(len(ttft)),
        "steady_sent": float(int(rate * seconds)),
        "steady_box_busy": busy,
        "steady_cpu_us_chunk": worker_s / max(len(ttft) * TOKENS, 1) * 1e6,
        **stages,
        # CPU ms a stream, by process group
        **{f"steady_direct_ms_{k}": v / max(len(base), 1) * MS for k, v in direct_used.items()},
        **{f"steady_ms_{k}": v / max(len(ttft), 1) * MS for k, v in group_used.items()},
    }
    out["steady_added_p50"] = out["steady_p50"] - out["steady_direct_p50"]
    out["steady_added_p99"] = out["steady_p99"] - out["steady_direct_p99"]
    return out
