"""Benchmark of the four lanes: a mixed day against the simulator, scaled to run in minutes.

Run: ``.venv/bin/python bench/bench_lanes.py [--requests 2000] [--window-s 240]``.
Needs Redis (SHEEPDOG_BENCH_REDIS_URL, default the local server's database 13) and PostgreSQL;
makes a throwaway database per run and starts its own simulator, worker and beat.

The same day (same requests, same deadlines relative to submit, the simulator's deterministic
answers) runs twice in this process:
1. four lanes: the provider sells flex and priority (SHEEPDOG_OPENAI_SERVICE_TIERS);
2. two lanes, today's: the same provider without tiers (low requests whose deadline cannot
   wait for a batch escalate to the full-price stream; high never gets priority).
Baselines, from the same run's ledgers (the same tokens at one rate): all standard (every
request streamed at the standard rate) and all priority. Every request must end succeeded
and every deadline be met; the table says how many were.

A "day" is the batch window, `--window-s` real seconds (flush every 2 s); the simulator
answers batches at once (time scale 1e6), flex calls 3x slower than standard, and refuses
flex calls past `--flex-capacity` in flight (429), which the flex lane retries and, when
its deadline is near, moves to the standard lane.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lanes_day import DayResult, day, result, wait_all  # noqa: E402
from bench.report import print_grid  # noqa: E402
from bench.stack import start_beat, start_worker, stop, worker_env  # noqa: E402
from core.settings import Settings  # noqa: E402
from sheepdog.client import Client  # noqa: E402
from simulator.config import SimulatorConfig  # noqa: E402
from simulator.server import SimulatorProcess  # noqa: E402
from tests.fixtures.pg import create_database, drop_database  # noqa: E402

REDIS = os.environ.get("SHEEPDOG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
FLEX_LEAD_S = 40.0
LANES = ("priority", "stream", "flex", "batch")


def simulator(capacity: int) -> SimulatorConfig:
    return SimulatorConfig(
        api_key="sk-bench",
        ttft_ms=30,
        chunk_delay_ms=2,
        answer_tokens=(30, 60),
        time_scale=1_000_000.0,
        batch_window_s=1e9,
        flex_capacity=capacity,
        data_dir=tempfile.mkdtemp(prefix="bench-lanes-sim-"),
    )


def run(sim: SimulatorProcess, args: argparse.Namespace, tiers: str, tag: str) -> DayResult:
    """One day on a fresh database, worker and beat; what its database says."""
    db = create_database("sheepdog_bench")
    logdir = Path(tempfile.mkdtemp(prefix=f"bench-lanes-{tag}-"))
    extra = {
        "SHEEPDOG_BROKER_PREFIX": f"bench-lanes-{tag}-{os.getpid()}:",
        "SHEEPDOG_OPENAI_SERVICE_TIERS": tiers,
        "SHEEPDOG_BATCH_WINDOW_S": str(args.window_s),
        "SHEEPDOG_BATCH_FLUSH_INTERVAL_S": "2",
        "SHEEPDOG_BATCH_POLL_INTERVAL_S": "1",
        "SHEEPDOG_FLEX_MIN_LEAD_S": str(FLEX_LEAD_S),
        "SHEEPDOG_FLEX_FALLBACK_LEAD_S": "15",
        "SHEEPDOG_STREAM_BACKOFF_MAX_S": "2",
        "SHEEPDOG_METRICS_PORT": "0",
    }
    env = worker_env(REDIS, db, sim, **extra)
    procs = [
        start_worker(env, logdir, f"lanes-{tag}", "stream,default,batch", "threads", 200),
        start_beat(env, logdir),
    ]
    try:
        settings = Settings(
            redis_url=REDIS,
            database_url=db,
            broker_prefix=extra["SHEEPDOG_BROKER_PREFIX"],
            openai_service_tiers=tiers,
            batch_window_s=args.window_s,
            batch_flush_interval_s=2,
            flex_min_lead_s=FLEX_LEAD_S,
        )
        client = Client(settings)
        warm = client.submit({**day(1, args.window_s, FLEX_LEAD_S)[0], "priority": "high"})
        client.result(warm, wait=120)  # the worker consumes
        requests = day(args.requests, args.window_s, FLEX_LEAD_S)
        client.submit_many(requests)
        refused = sim.stats()["counters"].get("errors.429", 0)
        seconds = wait_all(db, args.requests + 1, args.window_s * 3 + 120)
        out = result(db, seconds)
        out = replace(out, flex_429s=sim.stats()["counters"].get("errors.429", 0) - refused)
        if args.plot and tag == "four":
            plot(db, Path(args.plot))
        return out
    finally:
        stop(procs)
        drop_database(db)


def plot(db: str, path: Path) -> None:
    """What `sheepdog costs --plot` draws, for the four-lane day."""
    from core.db import session_scope
    from costs.plot import plot_daily
    from costs.report import daily_by_route

    with session_scope(db) as session:
        plot_daily(daily_by_route(session, None, by="lane"), path)
    print(f"plot of the four-lane day: {path}")


def money(value: Decimal) -> str:
    return f"${value:,.4f}"


def table(four: DayResult, two: DayResult) -> None:
    base = four.all_standard
    header = ["day", "cost", "vs all-standard", *LANES, "flex→stream", "flex 429s"]
    header += ["succeeded", "deadlines met", "took"]
    rows = [header]
    for name, r in (("four lanes", four), ("two lanes (today)", two)):
        rows.append(
            [
                name,
                money(r.paid),
                f"{r.paid / base:.3f}",
                *(str(r.by_lane.get(lane, 0)) for lane in LANES),
                str(r.fell_back),
                str(r.flex_429s),
                f"{r.succeeded}/{r.requests}",
                f"{r.deadlines_met}/{r.with_deadline}",
                f"{r.seconds:.0f}s",
            ]
        )
    empty = [""] * (len(header) - 3)
    priority = four.all_priority
    rows.append(["all standard (same tokens)", money(base), "1.000", *empty])
    rows.append(["all priority (same tokens)", money(priority), f"{priority / base:.3f}", *empty])
    print()
    print_grid(f"a mixed day of {four.requests - 1:,} requests (+1 warm-up), cost by lanes", rows)
    for name, r in (("four lanes", four), ("two lanes", two)):
        if r.missed:
            print(f"{name}: deadlines missed by lane: {r.missed}")
    saved = two.paid - four.paid
    print(f"\nfour lanes vs two: {money(saved)} less ({saved / two.paid:.1%} of today's cost)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--window-s", type=float, default=240.0)
    parser.add_argument("--flex-capacity", type=int, default=40)
    parser.add_argument("--plot", help="write the four-lane day's cost plot (PNG) here")
    args = parser.parse_args()
    with SimulatorProcess(simulator(args.flex_capacity)) as sim:
        four = run(sim, args, "flex,priority", "four")
        two = run(sim, args, "", "two")
    table(four, two)


if __name__ == "__main__":
    main()
