"""Benchmark of the batch path against the simulator at its fastest, on PostgreSQL.

Run: ``.venv/bin/python bench/bench_batch.py [--requests 100000] [--memory-mb 20,200]``.
Needs Redis and PostgreSQL (the same ones the tests use); makes a throwaway database.

Phases (each printed as a row of the table):
1. producer: prepare() alone; submit_many of every request into Redis with no worker running,
   against the baseline of submit() one request (one message) at a time; the worker-side bulk
   insert (record_requests, 500 rows a message) in-process;
2. flush: claim + write + upload + create, and the JSONL writing rate alone;
3. ingest: streamed download, parse and bulk writes into PostgreSQL;
4. round trip through a real worker and beat: submit_many (producer rate while the workers,
   beat and simulator share the cores), rows recorded by the intake tasks, every request
   succeeded;
5. peak memory of one ingest for output files of each size, in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from batch.flush import JobReport  # noqa: E402
from bench.batch_memory import memory  # noqa: E402
from bench.batch_steps import ingest_timed, record, wait_ingestable  # noqa: E402
from bench.bodies import low_requests  # noqa: E402
from bench.report import Measure, print_measures  # noqa: E402
from bench.stack import (  # noqa: E402
    Proc,
    batch_simulator,
    sim_settings,
    start_beat,
    start_worker,
    stop,
    worker_env,
)
from core.db import session_scope  # noqa: E402
from core.settings import Settings  # noqa: E402
from models.tables import BatchJob, Request  # noqa: E402
from simulator.server import SimulatorProcess  # noqa: E402
from tests.fixtures.pg import create_database  # noqa: E402
from tests.fixtures.pg import drop_database as drop_db  # noqa: E402

MODELS = ("sheepdog-mini", "gpt-4.1-mini")
REDIS = os.environ.get("SHEEPDOG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")


def new_db() -> str:
    return create_database("sheepdog_bench")


def requests(n: int, tag: str) -> list[dict[str, object]]:
    return low_requests(n, f"{tag} question number {{i}}, briefly", models=MODELS)


def count(settings: Settings, **where: str) -> int:
    with session_scope(settings.database_url) as session:
        stmt = select(func.count()).select_from(Request)
        for key, value in where.items():
            stmt = stmt.where(getattr(Request, key) == value)
        return int(session.scalar(stmt) or 0)


def ended(settings: Settings) -> int:
    return count(settings, status="succeeded") + count(settings, status="failed")


def timed_rate(n: int, fn: Callable[[], object]) -> float:
    """n / the seconds `fn()` takes."""
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def submit_alone(settings: Settings, n: int, rows: list[Measure]) -> None:
    """The producer on its own: submit_many of n requests into Redis under a key prefix no
    worker reads, against the baseline of one message per request (submit() in a loop)."""
    import redis

    from sheepdog.client import Client

    prefix = f"bench-submit-{os.getpid()}:"
    client = Client(settings.model_copy(update={"broker_prefix": prefix}))
    client.submit_many(requests(10, "warm"))
    base_n = max(n // 10, 1)
    one_rate = timed_rate(base_n, lambda: [client.submit(r) for r in requests(base_n, "one")])
    many_rate = timed_rate(n, lambda: client.submit_many(requests(n, "alone")))
    r = redis.Redis.from_url(REDIS)
    for key in r.scan_iter(f"{prefix}*"):
        r.delete(key)
    rows.append(("submit() one message each (baseline)", f"{one_rate:,.0f} req/s", ""))
    rows.append(
        (
            "submit_many, producer alone",
            f"{many_rate:,.0f} req/s",
            f">= 5,000; x{many_rate / one_rate:.1f} the baseline",
        )
    )


def jsonl_rate(db: str, jobs: list[JobReport], rows: list[Measure]) -> None:
    """The JSONL writing rate alone: every job's file written again from the database."""
    from batch.jsonl import write_job_file

    scratch = tempfile.mkdtemp(prefix="bench-jsonl-")
    t = time.perf_counter()
    lines = size = 0
    for job in jobs:
        with session_scope(db) as session:
            w = write_job_file(session, job.job_id, job.model, scratch, 1 << 40)
        lines += w.lines
        size += w.bytes
    write_s = time.perf_counter() - t
    rows.append(
        (
            "JSONL writing (DB cursor -> file)",
            f"{lines / write_s:,.0f} lines/s",
            f"{size / write_s / 1e6:.1f} MB/s",
        )
    )


def phases(sim: SimulatorProcess, n: int, rows: list[Measure]) -> None:
    """In-process phases: insert, flush, write rate, ingest."""
    from batch.flush import flush
    from sheepdog.client import Client

    db = new_db()
    try:
        settings = sim_settings(
            REDIS, db, sim, batch_workdir=tempfile.mkdtemp(prefix="bench-batch-")
        )
        client = Client(settings)
        t = time.perf_counter()
        items = [client.prepare(r) for r in requests(n, "phase")]
        prepare_s = time.perf_counter() - t
        rows.append(("producer prepare() (validate, cap)", f"{n / prepare_s:,.0f} req/s", ""))
        submit_alone(settings, n, rows)
        insert_rate = timed_rate(n, lambda: record(db, items))
        rows.append(("intake bulk insert (500/msg)", f"{insert_rate:,.0f} rows/s", ">= 5,000"))
        t = time.perf_counter()
        report = flush(settings)
        flush_s = time.perf_counter() - t
        rows.append(
            (
                "flush (claim+write+upload+create)",
                f"{n / flush_s:,.0f} req/s",
                f"{len(report.jobs)} jobs, {flush_s:.1f} s",
            )
        )
        jsonl_rate(db, report.jobs, rows)
        done, ingest_s = ingest_timed(settings, wait_ingestable(settings, len(report.jobs)))
        rows.append(("ingest into PostgreSQL", f"{done / ingest_s:,.0f} rows/s", ">= 20,000"))
    finally:
        drop_db(db)


def start_round_trip(env: dict[str, str], logs: Path) -> list[Proc]:
    """The intake worker, the batch worker and beat."""
    return [
        start_worker(env, logs, "intake", "default", "prefork", 2),
        start_worker(env, logs, "batch", "batch", "threads", 4),
        start_beat(env, logs),
    ]


def round_trip(sim: SimulatorProcess, n: int, rows: list[Measure]) -> None:
    """submit_many -> worker intake -> beat flush/poll -> ingest, through real processes."""
    import redis

    db = new_db()
    redis.Redis.from_url(REDIS).flushdb()
    workdir = tempfile.mkdtemp(prefix="bench-rt-")
    env = worker_env(
        REDIS,
        db,
        sim,
        SHEEPDOG_BATCH_WORKDIR=workdir,
        SHEEPDOG_BATCH_FLUSH_INTERVAL_S="2",
        SHEEPDOG_BATCH_POLL_INTERVAL_S="0.5",
        SHEEPDOG_BATCH_FLUSH_THRESHOLD=str(max(n // 2, 1)),
    )
    procs = start_round_trip(env, Path(workdir))
    try:
        time.sleep(4)  # workers up
        time_round_trip(sim_settings(REDIS, db, sim, batch_workdir=workdir), n, rows)
    finally:
        stop(procs)
        drop_db(db)


def time_round_trip(settings: Settings, n: int, rows: list[Measure]) -> None:
    """submit_many of n requests, then the time until the workers recorded them and until
    every one ended."""
    from sheepdog.client import Client

    client = Client(settings)
    batch = requests(n, "roundtrip")
    t0 = time.perf_counter()
    client.submit_many(batch)
    submit_s = time.perf_counter() - t0
    rows.append(
        (
            "submit_many, inside the round trip",
            f"{n / submit_s:,.0f} req/s",
            "same 2 cores as workers, beat, simulator",
        )
    )
    while count(settings) < n:
        time.sleep(0.05)
    recorded_s = time.perf_counter() - t0
    rows.append(("intake recorded by workers", f"{n / recorded_s:,.0f} req/s", ""))
    deadline = time.monotonic() + 600
    while ended(settings) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("round trip did not finish in 600 s")
        time.sleep(0.2)
    total = time.perf_counter() - t0
    with session_scope(settings.database_url) as session:
        njobs = session.scalar(select(func.count()).select_from(BatchJob))
    ok = count(settings, status="succeeded")
    rows.append(
        ("round trip (submit -> all ended)", f"{total:.1f} s", f"< 60 s; {ok} ok, {njobs} jobs")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--memory-mb", default="20,200")
    parser.add_argument("--skip", default="", help="comma list of: phases,roundtrip,memory")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rows: list[Measure] = []
    with SimulatorProcess(batch_simulator()) as sim:
        if "phases" not in skip:
            phases(sim, args.requests, rows)
        if "roundtrip" not in skip:
            round_trip(sim, args.requests, rows)
        if "memory" not in skip:
            for mb in (int(x) for x in args.memory_mb.split(",")):
                memory(sim, REDIS, mb, rows)
    print_measures(
        f"batch path, {args.requests:,} requests, simulator at time scale 1e6, PostgreSQL", rows
    )


if __name__ == "__main__":
    main()
