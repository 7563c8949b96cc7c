"""Benchmark of the streaming path: what Sheepdog adds to a direct SDK stream, and how many
streams one worker holds.

Run: ``.venv/bin/python bench/bench_stream.py [--requests 200] [--streams 1000] [--db pg|sqlite]``.
Starts its own simulator, uses Redis DB 15 (flushed) and a throwaway PostgreSQL database (or a
SQLite file), and one stream worker (threads pool, concurrency 1000: the CLI default).

1. latency: the same requests (a) straight through the SDK, (b) through Sheepdog, timed from
   submit to the first token seen by a pub/sub subscriber that subscribed before submitting.
   Added TTFT = Sheepdog TTFT - direct TTFT (p50, p99); added per-chunk delay = each chunk's
   offset from the first token through Sheepdog minus the same chunk's offset direct.
2. concurrency: N streams at once, each 50 chunks 100 ms apart. Baseline: the same N streams
   read straight from the simulator through the async SDK, in the same run (its own ~5 s).
   Through Sheepdog: the N messages sent in one burst as `submit_many` sends them (one Redis
   pipeline); wall time from the start of the send to the last `done`, each stream's time from
   the messages being in Redis to its row ending, completed, lost (a request not ended
   `succeeded` with a gap-free replay log of 50 tokens + done), worker CPU per chunk (utime +
   stime of the worker process).

   Also: each stream's start delay (its message sent -> its first token, from the row), the
   share of the box's two cores that was busy, and the simulator's own CPU in that window.
   Celery's own floor, in the same run: a stock Celery worker (bench/celery_floor.py: the same
   Celery settings, threads pool, events on, none of Sheepdog's code) timing a no-op task from
   before its apply_async to its body; Sheepdog's added TTFT cannot be below it. And the
   relay's floor: a bare redis-py PUBLISH from another process to the same kind of subscriber,
   5 ms apart (bench/relay_floor.py); Sheepdog's per-chunk relay cannot be below it.
   For the concurrency run, the same stock worker (one process) given n no-op tasks in one
   send: each one's delay from the send to its body, Celery's floor for starting a burst.
3. steady load (bench/stream_steady.py): new streams at --rate a second for --seconds (each
   50 chunks 100 ms apart: ~1,000 open at once), straight through the async SDK and then
   through Sheepdog; added TTFT p50 / p99 over the direct run, and the stream queue's length
   (its first and last ten seconds). Its worker gets --steady-slots slots (the streams open at
   once outnumber the default 1,000 a little).
4. TTFT breakdown: the worker runs with SHEEPDOG_STREAM_TRACE=1 and records each stream's stage
   times in Redis; medians of message sent -> task thread -> loop -> claim done / provider's
   first text -> first token queued -> seen by the subscriber.

Each phase runs --runs times; the table shows medians. --workers N runs N stream worker
processes on the host (the deployment recommendation is measured, not assumed): `sheepdog worker
--queues stream` starts one per core by default, i.e. --workers 2 on a 2-core host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.report import fmt, print_grid  # noqa: E402
from bench.stack import Proc, start_stream_worker, stop, stream_simulator, worker_env  # noqa: E402
from bench.stream_burst import concurrency  # noqa: E402
from bench.stream_floors import start_floor_worker  # noqa: E402
from bench.stream_latency import latency  # noqa: E402
from bench.stream_steady import steady  # noqa: E402
from bench.stream_table import table  # noqa: E402
from core.settings import Settings  # noqa: E402
from models.migrate import upgrade  # noqa: E402
from sheepdog.client import Client  # noqa: E402
from simulator.server import SimulatorProcess  # noqa: E402
from tests.fixtures.pg import create_database, drop_database  # noqa: E402

REDIS = os.environ.get("SHEEPDOG_BENCH_STREAM_REDIS_URL", "redis://127.0.0.1:6379/15")
Runs = list[dict[str, float]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--db", choices=["pg", "sqlite"], default="pg")
    parser.add_argument("--runs", type=int, default=3, help="repeat each phase; medians shown")
    parser.add_argument(
        "--skip", choices=["latency", "concurrency", "steady"], action="append", default=[]
    )
    parser.add_argument("--rate", type=float, default=200.0, help="steady load: streams a second")
    parser.add_argument("--seconds", type=float, default=60.0, help="steady load: how long")
    parser.add_argument("--steady-slots", type=int, default=1500, help="steady load: slots")
    parser.add_argument(
        "--steady-without-rows",
        action="store_true",
        help="steady load: the producer does not write the rows (SHEEPDOG_PRODUCER_WRITES_ROWS=0)",
    )
    parser.add_argument("--workers", type=int, default=1, help="stream worker processes")
    parser.add_argument(
        "--rows-ab",
        action="store_true",
        help="latency also without the producer's row write (SHEEPDOG_PRODUCER_WRITES_ROWS=0), "
        "same run, alternating phases",
    )
    return parser.parse_args()


def new_db(kind: str, workdir: Path) -> str:
    """A throwaway PostgreSQL database, or a SQLite file in `workdir`, migrated."""
    if kind == "pg":
        return create_database("sheepdog_bstream")
    url = f"sqlite:///{workdir / 'bench.db'}"
    upgrade(url)
    return url


def run_phases(
    args: argparse.Namespace, sim: SimulatorProcess, db_url: str, workdir: Path
) -> tuple[Runs, Runs, Runs, Runs]:
    """Each phase --runs times: (latency runs, burst runs, latency runs without the producer's
    row write, steady-load runs)."""
    r = redis.Redis.from_url(REDIS)
    env = worker_env(REDIS, db_url, sim, SHEEPDOG_STREAM_TRACE="1")
    settings = Settings(
        redis_url=REDIS,
        database_url=db_url,
        openai_base_url=sim.base_url,
        openai_api_key=sim.api_key,
    )
    client = Client(settings)
    without_rows = Client(settings.model_copy(update={"producer_writes_rows": False}))
    lat: Runs = []
    conc: Runs = []
    lat_without: Runs = []
    std: Runs = []
    procs: list[Proc] = [start_stream_worker(env, workdir, i) for i in range(args.workers)]
    procs.append(start_floor_worker(env, workdir))  # Celery's floor, in both phases
    pids = [p.pid for p in procs[: args.workers]]  # not the floor worker
    try:
        for run in range(args.runs):
            if "latency" not in args.skip and args.rows_ab:
                lat_without.append(latency(sim, without_rows, r, args.requests))
                print(f"run {run + 1} latency, no producer row: {fmt(lat_without[-1])}")
            if "latency" not in args.skip:
                lat.append(latency(sim, client, r, args.requests))
                print(f"run {run + 1} latency: {fmt(lat[-1])}", flush=True)
            if "concurrency" not in args.skip:
                conc.append(concurrency(sim, client, r, pids, args.streams, db_url))
                print(f"run {run + 1} concurrency: {fmt(conc[-1])}", flush=True)
        if "steady" not in args.skip:
            stop(procs[: args.workers], 30)
            slots = args.steady_slots
            procs[: args.workers] = [
                start_stream_worker(env, workdir, i, slots) for i in range(args.workers)
            ]
            for run in range(args.runs):
                pids = [p.pid for p in procs[: args.workers]]
                producer = without_rows if args.steady_without_rows else client
                std.append(steady(sim, producer, r, db_url, args.rate, args.seconds, pids))
                print(f"run {run + 1} steady: {fmt(std[-1])}", flush=True)
    finally:
        stop(procs, 30)
    return lat, conc, lat_without, std


def print_rows_ab(lat: Runs, lat_without: Runs) -> None:
    """Added TTFT with and without the producer writing the row."""
    for key in ("added_ttft_p50", "added_ttft_p99"):
        off = statistics.median(x[key] for x in lat_without)
        on = statistics.median(x[key] for x in lat)
        print(f"producer writes rows, {key}: {off:.2f} ms without -> {on:.2f} ms with")


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sheepdog-bench-stream-"))
    db_url = new_db(args.db, workdir)
    redis.Redis.from_url(REDIS).flushdb()
    with SimulatorProcess(stream_simulator(workdir)) as sim:
        lat, conc, lat_without, std = run_phases(args, sim, db_url, workdir)
    if args.db == "pg":
        drop_database(db_url)
    if lat_without:
        print_rows_ab(lat, lat_without)
    title = (
        f"\nstreaming path ({args.db}, {os.cpu_count()} cores, {args.workers} worker process(es),"
        f" medians of {args.runs} runs)"
    )
    print_grid(title, table(lat, conc, args.streams, std, args.rate))


if __name__ == "__main__":
    main()
