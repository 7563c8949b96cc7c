"""Benchmark of the stream engine's provider reads: CPU a chunk of its own HTTP client
(streaming/provider_http.py through stream_once) against aiohttp reading the same streams.

Run: ``.venv/bin/python bench/bench_provider_read.py [--streams 1000] [--rounds 3]``. Starts its
own simulator (50 chunks 100 ms apart, 20 ms to the first); each round reads `--streams` streams
at once on one uvloop loop, first one way, then the other (the order turns each round). The
baseline is what the engine did before: aiohttp's client (one pool, the payload read with
`iter_any`) and the same SSE parsing and text callback, per chunk a wakeup of the stream's
task. Figures: the process's CPU (user + system) over the round divided by the chunks read, the
round's wall time; medians of the rounds and the ratio against aiohttp in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import uvloop  # noqa: E402

from bench.report import print_grid  # noqa: E402
from bench.stack import stream_simulator  # noqa: E402
from simulator.server import SimulatorProcess  # noqa: E402
from streaming.provider_http import ProviderHttp  # noqa: E402
from streaming.provider_stream import Endpoint, stream_once  # noqa: E402

TOKENS = 50
Reader = Callable[[str, dict[str, str], dict[str, Any], int], Coroutine[Any, Any, int]]


async def with_engine(url: str, headers: dict[str, str], body: dict[str, Any], n: int) -> int:
    """`n` streams at once through the engine's client; the chunks read."""
    endpoint = Endpoint(ProviderHttp(url), headers)
    chunks = 0

    def on_text(_: str) -> bool:
        nonlocal chunks
        chunks += 1
        return True

    async def one() -> None:
        await stream_once(
            endpoint,
            body,
            include_usage=True,
            timeout_s=60,
            idle_timeout_s=30,
            answer_max_s=600,
            on_text=on_text,
        )

    await asyncio.gather(*(one() for _ in range(n)))
    endpoint.http.close()
    return chunks


async def with_aiohttp(url: str, headers: dict[str, str], body: dict[str, Any], n: int) -> int:
    """The same through aiohttp, parsed as the engine did before (the baseline)."""
    payload = orjson.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = 0

    async def on_text(_: str) -> bool:
        nonlocal chunks
        chunks += 1
        return True

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(url, data=payload, headers=headers) as response:
            rest = b""
            async for data in response.content.iter_any():
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    raw = line[5:].strip()
                    if raw == b"[DONE]":
                        return
                    for choice in orjson.loads(raw).get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            await on_text(text)

    connector = aiohttp.TCPConnector(limit=4000)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(n)))
    return chunks


def measure(read: Reader, url: str, headers: dict[str, str], n: int) -> dict[str, float]:
    body = {"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "hi"}]}
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    chunks: int = uvloop.run(read(url, headers, body, n))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if chunks != n * TOKENS:
        print(f"{read.__name__}: {chunks} chunks, expected {n * TOKENS}", flush=True)
    return {"us_chunk": cpu / max(chunks, 1) * 1e6, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ways: dict[str, Reader] = {"aiohttp": with_aiohttp, "engine": with_engine}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    workdir = Path(tempfile.mkdtemp(prefix="sheepdog-bench-read-"))
    with SimulatorProcess(stream_simulator(workdir)) as sim:
        sim.configure(ttft_ms=20, chunk_delay_ms=100, answer_tokens=[TOKENS, TOKENS])
        url = f"{sim.base_url.rstrip('/')}/chat/completions"
        headers = {"Authorization": f"Bearer {sim.api_key}", "Content-Type": "application/json"}
        measure(with_engine, url, headers, 10)  # warm-up: imports, the simulator's first calls
        for i in range(args.rounds):
            order = list(ways) if i % 2 == 0 else list(reversed(ways))
            for name in order:
                runs[name].append(measure(ways[name], url, headers, args.streams))
                print(f"round {i + 1} {name}: {runs[name][-1]}", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base, ours = med("aiohttp", "us_chunk"), med("engine", "us_chunk")
    rows = [
        ["", "aiohttp (baseline)", "the engine's client", "ratio"],
        [
            f"{args.streams} streams x {TOKENS} chunks: CPU a chunk",
            f"{base:.1f} us",
            f"{ours:.1f} us",
            f"x{ours / base:.2f}",
        ],
        [
            "  wall (100 ms between chunks: ~5 s is the answer)",
            f"{med('aiohttp', 'wall_s'):.2f} s",
            f"{med('engine', 'wall_s'):.2f} s",
            "",
        ],
    ]
    print_grid(f"\nprovider reads (medians of {args.rounds} rounds)", rows)


if __name__ == "__main__":
    main()
