"""Benchmark of the front door (`sheepdog api`): what HTTP adds, against baselines in the same run.

Run: ``.venv/bin/python bench/bench_api.py [--requests 30] [--intake 2000] [--clients 64]
[--streams 200] [--api-processes 2]``; the issue's full sizes are ``--requests 200 --intake
10000 --streams 1000``. Starts its own simulator, a throwaway PostgreSQL database, one stream
worker process and `sheepdog api`, and uses Redis DB 13 (flushed; SHEEPDOG_BENCH_API_REDIS_URL
to change it).

1. Time to first token, the same kind of request four ways, interleaved: a direct SDK stream
   to the simulator (the baseline), the in-deployment client (submit + pub/sub follow), the
   front door through sheepdog-client (POST /v1/requests, then GET …/events over SSE), and the
   same OpenAI SDK pointed at the front door (one streaming POST /v1/chat/completions); and,
   in the same rounds, the floor of one HTTP hop on this box: an httpx GET of /healthz (the
   front door idle before each call, as it is before each of the others).
2. Low-priority intake over HTTP: `--clients` keep-alive clients, one request per call, then the
   bulk form (lists of `--bulk`, 4 clients): accepted requests/s and accept latency. Baselines:
   the in-deployment client in one process, `submit` one by one and `submit_many` in lists. No
   intake worker runs, so the rate is the front door's (the messages wait in Redis). With wrk
   installed, one request per call again for `--wrk-seconds`, the load from wrk (bench/wrk_load.py:
   a tenth of aiohttp's CPU a call, which shares the two cores with the API).
3. `--streams` event streams at once, each answer 50 chunks 100 ms apart: submitted in lists
   over HTTP and followed by one SSE connection each, against the simulator serving the same
   number of streams directly (wall ratio), and the same streams followed without the front
   door (in-deployment submit_many + asyncio followers: what Sheepdog's worker costs); lost = a
   stream that did not end `done` with 50 tokens and gap-free seqs; API CPU per relayed event
   (all API processes, utime + stime).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python" / "src"))

import httpx  # noqa: E402
import redis  # noqa: E402
from sheepdog_client import Client as HttpClient  # noqa: E402

from bench import api_load, wrk_load  # noqa: E402
from bench.cpu import tree_cpu  # noqa: E402
from bench.report import pct, print_grid  # noqa: E402
from bench.stack import (  # noqa: E402
    Proc,
    spawn,
    start_stream_worker,
    stop,
    stream_simulator,
    worker_env,
)
from core.settings import Settings  # noqa: E402
from sheepdog.client import Client  # noqa: E402
from sheepdog.tenant_keys import create_key  # noqa: E402
from simulator.server import SimulatorProcess  # noqa: E402
from tests.fixtures.pg import create_database, drop_database  # noqa: E402

REDIS = os.environ.get("SHEEPDOG_BENCH_API_REDIS_URL", "redis://127.0.0.1:6379/13")


def start_api(env: dict[str, str], logdir: Path, processes: int) -> tuple[Proc, str]:
    port = 18000 + secrets.randbelow(2000)
    cmd = [sys.executable, "-m", "sheepdog", "api", "--port", str(port)]
    proc = spawn([*cmd, "--processes", str(processes)], env, logdir / "api.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # its processes take a while to start on a loaded box
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sheepdog api exited:\n{(logdir / 'api.log').read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()  # SIGTERM: the parent stops its server processes too (SIGKILL would not)
    proc.wait(30)
    raise RuntimeError("sheepdog api not ready after 180 s")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


Rows = list[list[str]]


def ttft_rows(lat: dict[str, list[float]]) -> Rows:
    """Time to first token added by each path, against the direct SDK stream."""
    d50, d99 = pct(lat["direct"], 0.5), pct(lat["direct"], 0.99)
    rows = []
    for name, label in (
        ("local", "in-deployment client"),
        ("door", "front door (HTTP SSE)"),
        ("openai", "the same SDK via the front door"),
    ):
        p50, p99 = pct(lat[name], 0.5), pct(lat[name], 0.99)
        rows.append(
            [
                f"TTFT p50 / p99, {label}",
                f"direct SDK stream {ms(d50)} / {ms(d99)}",
                f"{(p50 - d50) * 1000:+.2f} / {(p99 - d99) * 1000:+.2f} ms",
                "+4 / +12 ms" if name != "local" else "",
            ]
        )
    post = f"{ms(pct(lat['door_post'], 0.5))} / {ms(pct(lat['door_post'], 0.99))}"
    rows.append(["  of which POST /v1/requests → 202, p50 / p99", "", post, ""])
    hop = f"{ms(pct(lat['hop'], 0.5))} / {ms(pct(lat['hop'], 0.99))}"
    rows.append(["HTTP hop: GET /healthz round trip, p50 / p99", "", hop, ""])
    return rows


def intake_rows(intake: dict[str, Any]) -> Rows:
    """Low-priority intake over HTTP, against the in-deployment client."""

    def rate(x: dict[str, Any]) -> float:
        return float(x["accepted"]) / x["wall"]

    one, bulk = intake["http_one"], intake["http_bulk"]
    lo, lb = intake["local_one"], intake["local_bulk"]
    wrk = intake.get("wrk")
    if not wrk:
        by_wrk = "not measured: wrk is not installed (apt-get install wrk)"
    elif "failed" in wrk:
        by_wrk = f"not measured: {wrk['failed']}"
    else:
        by_wrk = (
            f"{wrk['rate']:,.0f}/s (x{wrk['rate'] / rate(lo):.2f}), p50 {ms(wrk['p50'])}, p99"
            f" {ms(wrk['p99'])}, {wrk['refused']} refused {wrk['errors']}"
        ).rstrip()
    return [
        [
            "low intake, 1 a call: accepted/s, p99 accept",
            f"in-deployment submit, 1 process: {rate(lo):,.0f}/s, p99 {ms(pct(lo['lat'], 0.99))}",
            f"{rate(one):,.0f}/s (x{rate(one) / rate(lo):.2f}), p99 {ms(pct(one['lat'], 0.99))},"
            f" {one['refused']} refused",
            "≥ 3,000/s, p99 ≤ 25 ms",
        ],
        ["  the same, load from wrk (C, 1 thread)", "", by_wrk, "≥ 3,000/s, p99 ≤ 25 ms"],
        [
            "low intake, bulk lists: accepted/s",
            f"in-deployment submit_many: {rate(lb):,.0f}/s",
            f"{rate(bulk):,.0f}/s (x{rate(bulk) / rate(lb):.2f}), {bulk['refused']} refused",
            "",
        ],
    ]


def stream_rows(conc: dict[str, Any], n: int) -> Rows:
    """n event streams at once, against the simulator alone and the in-deployment followers."""
    events = conc["tokens"] + n
    return [
        [
            f"{n:,} SSE streams x 50 chunks 100 ms apart: wall",
            f"simulator alone {conc['sim_wall']:.2f} s",
            f"{conc['wall']:.2f} s (x{conc['wall'] / conc['sim_wall']:.2f})",
            "x1.3",
        ],
        [
            "  same streams without the front door",
            "in-deployment submit_many + astream followers",
            f"{conc['local_wall']:.2f} s (x{conc['local_wall'] / conc['sim_wall']:.2f})",
            "",
        ],
        ["  lost", "", f"{conc['lost']}", "0"],
        [
            "  API CPU per relayed event",
            "",
            f"{conc['api_cpu_s'] / max(events, 1) * 1e6:.0f} µs ({conc['api_cpu_s']:.2f} s)",
            "",
        ],
    ]


def table(
    lat: dict[str, list[float]], intake: dict[str, Any], conc: dict[str, Any], n: int
) -> Rows:
    header = ["", "baseline, same run", "through the front door", "target"]
    return [header, *ttft_rows(lat), *intake_rows(intake), *stream_rows(conc, n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30, help="TTFT samples per path")
    parser.add_argument("--intake", type=int, default=2000, help="low requests per intake form")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--bulk", type=int, default=500)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument(
        "--wrk-seconds", type=int, default=5, help="intake driven by wrk, if installed"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sheepdog-bench-api-"))
    db_url = create_database("sheepdog_bstream")
    redis.Redis.from_url(REDIS).flushdb()
    tag = secrets.token_hex(3)
    procs: list[Proc] = []
    with SimulatorProcess(stream_simulator(workdir)) as sim:
        env = worker_env(REDIS, db_url, sim, SHEEPDOG_METRICS_PORT="0")
        settings = Settings(redis_url=REDIS, database_url=db_url)
        local = Client(settings)
        try:
            procs.append(start_stream_worker(env, workdir))
            api, url = start_api(env, workdir, args.api_processes)
            procs.append(api)
            key, _ = create_key(db_url, "bench")
            with HttpClient(url, api_key=key, timeout=120) as door:
                sim_at = (sim.base_url, sim.api_key)
                api_load.ttft(*sim_at, door, url, key, local, 3, tag + "w")  # warm-up
                lat = api_load.ttft(*sim_at, door, url, key, local, args.requests, tag)
            print(f"ttft done ({args.requests} each)", flush=True)
            intake = api_load.intake(url, key, local, args.intake, args.clients, args.bulk, tag)
            if wrk_load.available():
                intake["wrk"] = wrk_load.intake(url, key, args.clients, args.wrk_seconds, tag)
            print(f"intake done ({args.intake} each)", flush=True)
            conc = api_load.streams(
                sim, url, key, local, args.streams, tag, lambda: tree_cpu(api.pid)
            )
            print(f"streams done ({args.streams})", flush=True)
        finally:
            stop(procs, 30)
    drop_database(db_url)
    redis.Redis.from_url(REDIS).flushdb()
    title = (
        f"\nfront door ({os.cpu_count()} cores, {args.api_processes} API process(es), 1 stream"
        f" worker process, {args.requests} TTFT samples, {args.intake} intake requests)"
    )
    print_grid(title, table(lat, intake, conc, args.streams))


if __name__ == "__main__":
    main()
