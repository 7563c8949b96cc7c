"""Benchmark of the provider simulator: concurrent SSE streams and a 50,000-line batch.

Run: ``.venv/bin/python bench/bench_simulator.py [--seconds 5] [--streams 500,1000]``.
The server runs in a subprocess (``SimulatorProcess``); the client is a bare asyncio protocol on
uvloop that only counts SSE events, so the figures are the server's, not an SDK's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulator.config import SimulatorConfig
from simulator.server import SimulatorProcess

MODEL = "gpt-4.1-mini"
TOKENS = 50


class StreamClient(asyncio.Protocol):
    """One keep-alive connection that streams completions back to back and times each event."""

    def __init__(self, request: bytes, gaps: list[float], stop_at: float) -> None:
        self.request = request
        self.gaps = gaps
        self.stop_at = stop_at
        self.events = 0
        self.streams = 0
        self.last = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.last = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        count = data.count(b"\n\n")
        if count and now <= self.stop_at:
            self.gaps.append(now - self.last)
            self.gaps.extend([0.0] * (count - 1))
            self.last = now
            self.events += count
        if b"data: [DONE]" in data:
            self.streams += 1
            if now < self.stop_at:
                self._send()
            elif self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def http_request(host: str, port: int, key: str, prompt: str) -> bytes:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def stream_load(sim: SimulatorProcess, streams: int, seconds: float) -> dict[str, float]:
    """``streams`` concurrent connections streaming for ``seconds``; events/s and gaps."""
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    stop_at = time.perf_counter() + seconds
    clients: list[StreamClient] = []
    started = time.perf_counter()
    for index in range(streams):
        request = http_request(sim.host, sim.port, sim.api_key, f"bench {index}")
        _, client = await loop.create_connection(
            lambda r=request: StreamClient(r, gaps, stop_at), sim.host, sim.port
        )
        clients.append(client)
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), seconds + 60)
    elapsed = stop_at - started  # events are counted inside this window only
    events = sum(c.events for c in clients)
    ordered = sorted(gaps)
    return {
        "events_per_s": events / elapsed,
        "streams_done": sum(c.streams for c in clients),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(len(ordered) * 0.99)],
    }


def batch_run(sim: SimulatorProcess, lines: int) -> tuple[float, float, str]:
    """(upload s, create→final s, status) of a batch of ``lines`` lines."""
    from openai import OpenAI

    client = OpenAI(base_url=sim.base_url, api_key=sim.api_key, max_retries=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.jsonl"
        with path.open("w") as out:
            for i in range(lines):
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}]}
                row = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
                out.write(json.dumps({**row, "body": body}) + "\n")
        started = time.perf_counter()
        uploaded = client.files.create(file=path.open("rb"), purpose="batch")
        upload = time.perf_counter() - started
    started = time.perf_counter()
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    took = time.perf_counter() - started
    if batch.output_file_id:
        rows = client.files.content(batch.output_file_id).text.count("\n")
        assert rows == lines, rows
    return upload, took, batch.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--streams", default="500,1000")
    parser.add_argument("--delays", default="50,0", help="chunk delays to try, ms")
    parser.add_argument("--batch-lines", type=int, default=50_000)
    parser.add_argument(
        "--time-scale",
        type=float,
        default=10_000,
        help="batch time scale (10,000: 0.2 s a line → 20 µs, 24 h window → 8.6 s)",
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    config = SimulatorConfig(
        api_key="sk-bench", answer_tokens=(TOKENS, TOKENS), time_scale=args.time_scale
    )
    with SimulatorProcess(config) as sim:
        print(
            f"{'streams':>8} {'delay ms':>9} {'chunks/s':>10} {'streams done':>13}"
            f" {'p50 gap ms':>11} {'p99 gap ms':>11}"
        )
        for streams in (int(s) for s in args.streams.split(",")):
            for delay in (float(d) for d in args.delays.split(",")):
                sim.configure(chunk_delay_ms=delay)
                result = asyncio.run(stream_load(sim, streams, args.seconds))
                print(
                    f"{streams:>8} {delay:>9g} {result['events_per_s']:>10,.0f}"
                    f" {result['streams_done']:>13,.0f} {result['p50_ms']:>11.2f}"
                    f" {result['p99_ms']:>11.2f}",
                    flush=True,
                )
        sim.configure(chunk_delay_ms=0)
        print()
        for per_line in (0.2, 0.0):
            sim.configure(batch_seconds_per_line=per_line)
            upload, took, status = batch_run(sim, args.batch_lines)
            print(
                f"batch of {args.batch_lines:,} lines, time scale {args.time_scale:g},"
                f" {per_line:g} s a line: upload {upload:.2f} s, create → {status} {took:.2f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
