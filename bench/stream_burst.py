"""bench_stream.py's burst run: n streams sent at once through the stream worker(s), against
the simulator serving the same n streams straight through the async SDK in the same run."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import redis
from openai import AsyncOpenAI, DefaultAioHttpClient
from sqlalchemy import func, select

from bench.bodies import chat_body
from bench.cpu import CpuWindow, process_tree
from bench.report import pct
from bench.stream_floors import celery_floor
from core import keys
from core.db import session_scope
from models.tables import Request
from sheepdog.client import Client
from simulator.server import SimulatorProcess

TOKENS = 50  # each stream's answer


def is_engine(pid: int) -> bool:
    """True for a stream engine process (`python -m streaming.engine`)."""
    with contextlib.suppress(OSError):
        return b"streaming.engine" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def simulator_alone(sim: SimulatorProcess, n: int, tag: str) -> dict[str, float]:
    """The simulator's own time for n concurrent streams, read straight through the SDK."""

    async def one(sdk: AsyncOpenAI, i: int) -> tuple[float, float, int]:
        t0 = time.time()
        chunks = 0
        async with sdk.chat.completions.with_streaming_response.create(
            **chat_body(i, tag), stream=True
        ) as resp:
            async for data in resp.iter_bytes():
                chunks += data.count(b'"content":"')
        return t0, time.time(), chunks

    async def run() -> list[tuple[float, float, int]]:
        http = DefaultAioHttpClient(timeout=120)
        async with AsyncOpenAI(
            base_url=sim.base_url, api_key=sim.api_key, max_retries=0, http_client=http
        ) as sdk:
            return await asyncio.gather(*(one(sdk, i) for i in range(n)))

    runs = asyncio.run(run())
    return {
        "wall": max(e for _, e, _ in runs) - min(s for s, _, _ in runs),
        "each_p50": pct([e - s for s, e, _ in runs], 0.5),
        "each_max": max(e - s for s, e, _ in runs),
    }


def start_pyspy(pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy recording `pid` for this run when BENCH_PYSPY names its output (py-spy
    installed); BENCH_PYSPY_RATE and BENCH_PYSPY_ARGS (e.g. --gil) tune it."""
    if not os.environ.get("BENCH_PYSPY"):
        return None
    cmd = ["py-spy", "record", "-p", str(pid), "-d", os.environ.get("BENCH_PYSPY_SECONDS", "12")]
    cmd += ["-r", os.environ.get("BENCH_PYSPY_RATE", "40"), "-f", "raw"]
    cmd += ["-o", os.environ["BENCH_PYSPY"], "--nonblocking"]
    cmd += os.environ.get("BENCH_PYSPY_ARGS", "").split()
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ended_rows(db_url: str, ids: list[str], timeout_s: float = 120) -> list[Any]:
    """The requests' rows, once all have ended (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope(db_url) as session:
            done = session.scalar(
                select(func.count()).where(Request.id.in_(ids), Request.finished_at.is_not(None))
            )
        if (done or 0) >= len(ids):
            break
        time.sleep(0.2)
    columns = (Request.id, Request.status, Request.first_token_at, Request.finished_at)
    with session_scope(db_url) as session:
        return list(session.execute(select(*columns).where(Request.id.in_(ids))).all())


def replay_logs(r: redis.Redis, client: Client, ids: list[str]) -> list[list[dict[str, Any]]]:
    """Each stream's replay log (its messages), once every log ends or 10 s have passed: a row
    ends before its last message is published (a subscriber that sees `done` can read the
    finished row), so the last few streams' `done` get a moment before losses are counted."""
    key = keys.of(client.settings).replay_log
    settle = time.monotonic() + 10
    while time.monotonic() < settle:
        with r.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.xrevrange(key(rid), count=1)
            last = pipe.execute()
        if all(e and orjson.loads(e[0][1][b"m"])["type"] in ("done", "error") for e in last):
            break
        time.sleep(0.2)
    with r.pipeline(transaction=False) as pipe:
        for rid in ids:
            pipe.xrange(key(rid))
        logs = pipe.execute()
    return [[orjson.loads(fields[b"m"]) for _, fields in entries] for entries in logs]


def losses(ids: list[str], logs: list[list[dict[str, Any]]], rows: list[Any]) -> tuple[int, int]:
    """(streams lost, tokens relayed): lost is a request not ended `succeeded` with a gap-free
    replay log of TOKENS tokens and done. Why each was lost is printed."""
    succeeded = {row.id for row in rows if row.status == "succeeded"}
    lost = chunks = 0
    why: collections.Counter[str] = collections.Counter()
    for rid, msgs in zip(ids, logs, strict=True):
        tokens = sum(1 for m in msgs if m["type"] == "token")
        chunks += tokens
        ok = (
            rid in succeeded
            and [m["seq"] for m in msgs] == list(range(len(msgs)))
            and tokens == TOKENS
            and msgs[-1]["type"] == "done"
        )
        lost += not ok
        if not ok:
            status = next((row.status for row in rows if row.id == rid), "no row")
            why[f"{status}, {tokens} tokens, last {msgs[-1]['type'] if msgs else 'none'}"] += 1
    if why:
        print(f"not complete: {dict(why)}", flush=True)
    return lost, chunks


def timings(rows: list[Any], sent: dict[str, float], t0: float, t_sent: float) -> dict[str, float]:
    """Wall time to the last end, each stream's time to its end and to its first token (s)."""
    finished = {row.id: row.finished_at.timestamp() for row in rows if row.finished_at}
    each = [finished[rid] - sent[rid] for rid in finished]
    start = [row.first_token_at.timestamp() - sent[row.id] for row in rows if row.first_token_at]
    nan = float("nan")
    return {
        "wall": (max(finished.values()) - t0) if finished else nan,
        "after_send": (max(finished.values()) - t_sent) if finished else nan,
        "each_p50": pct(each, 0.5),
        "each_max": max(each) if each else nan,
        "start_p50": pct(start, 0.5),
        "start_max": max(start) if start else nan,
    }


def concurrency(
    sim: SimulatorProcess, client: Client, r: redis.Redis, workers: list[int], n: int, db_url: str
) -> dict[str, float]:
    """n streams at once through one worker, against the simulator's own time for them."""
    sim.configure(ttft_ms=0, chunk_delay_ms=100, answer_tokens=[TOKENS, TOKENS])
    tag = secrets.token_hex(3)
    alone = simulator_alone(sim, n, "alone" + tag)
    items = [client.prepare({**chat_body(i, tag), "priority": "normal"}) for i in range(n)]
    ids = [item.id for item in items]
    # Each worker with its stream engine (a child process): both are the worker's CPU.
    procs = [p for w in workers for p in process_tree(w)]
    spy = start_pyspy(procs[0] if os.environ.get("BENCH_PYSPY_WORKER") else procs[-1])
    assert sim.process is not None
    window = CpuWindow([*procs, sim.process.pid])
    t0 = time.time()
    client._enqueue(items)  # as submit_many sends a burst: one pipeline, then the rows
    sent = dict.fromkeys(ids, time.time())
    t_sent = time.time()
    rows = ended_rows(db_url, ids)
    used, busy = window.read()
    cpu, sim_cpu = sum(used[:-1]), used[-1]
    engine_cpu = sum(u for p, u in zip(procs, used[:-1], strict=True) if is_engine(p))
    logs = replay_logs(r, client, ids)  # before the short TTL of an ended log runs out
    if spy is not None:
        spy.wait()
    floor_burst = [ms / 1000 for ms in celery_floor(client.settings.redis_url).measure_burst(n)]
    times = timings(rows, sent, t0, t_sent)
    lost, chunks = losses(ids, logs, rows)
    return {
        "sim_wall": alone["wall"],
        "sim_each_p50": alone["each_p50"],
        "sim_each_max": alone["each_max"],
        "send": t_sent - t0,
        "floor_start_p50": pct(floor_burst, 0.5),
        "floor_start_max": max(floor_burst),
        **times,
        "box_busy": busy,
        "sim_cpu_s": sim_cpu,
        "completed": float(sum(1 for row in rows if row.status == "succeeded")),
        "lost": float(lost),
        "cpu_s": cpu,
        "cpu_us_chunk": cpu / max(chunks, 1) * 1e6,
        "engine_us_chunk": engine_cpu / max(chunks, 1) * 1e6,
        "consumer_us_chunk": (cpu - engine_cpu) / max(chunks, 1) * 1e6,
    }
