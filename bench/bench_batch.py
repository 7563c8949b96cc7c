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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydantic import SecretStr  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from core.db import session_scope  # noqa: E402
from core.settings import Settings  # noqa: E402
from models.tables import BatchJob, Request  # noqa: E402
from simulator.config import SimulatorConfig  # noqa: E402
from simulator.server import SimulatorProcess  # noqa: E402
from tests.fixtures.pg import create_database  # noqa: E402
from tests.fixtures.pg import drop_database as drop_db  # noqa: E402

MODELS = ["sheepdog-mini", "gpt-4.1-mini"]
REDIS = os.environ.get("SHEEPDOG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")


def new_db() -> str:
    return create_database("sheepdog_bench")


def bench_settings(db: str, sim: SimulatorProcess, workdir: str, **extra: Any) -> Settings:
    return Settings().model_copy(
        update={
            "database_url": db,
            "redis_url": REDIS,
            "openai_base_url": sim.base_url,
            "openai_api_key": SecretStr(sim.api_key),
            "batch_workdir": workdir,
            **extra,
        }
    )


def requests(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "model": MODELS[i % 2],
            "messages": [{"role": "user", "content": f"{tag} question number {i}, briefly"}],
            "priority": "low",
            "max_tokens": 40,
        }
        for i in range(n)
    ]


def count(settings: Settings, **where: str) -> int:
    with session_scope(settings.database_url) as session:
        stmt = select(func.count()).select_from(Request)
        for key, value in where.items():
            stmt = stmt.where(getattr(Request, key) == value)
        return int(session.scalar(stmt) or 0)


def wait_final(settings: Settings, n: int, timeout: float) -> None:
    from batch.ingest import ingest
    from batch.poll import poll

    deadline = time.monotonic() + timeout
    while count(settings, status="succeeded") + count(settings, status="failed") < n:
        if time.monotonic() > deadline:
            raise TimeoutError("requests did not end in time")
        for job_id in poll(settings).to_ingest:
            ingest(job_id, settings)
        time.sleep(0.05)


def submit_alone(settings: Settings, n: int, rows: list[tuple[str, str, str]]) -> None:
    """The producer on its own: submit_many of n requests into Redis under a key prefix no
    worker reads, against the baseline of one message per request (submit() in a loop)."""
    import redis

    from sheepdog.client import Client

    prefix = f"bench-submit-{os.getpid()}:"
    client = Client(settings.model_copy(update={"broker_prefix": prefix}))
    client.submit_many(requests(10, "warm"))
    base_n = max(n // 10, 1)
    t = time.perf_counter()
    for request in requests(base_n, "one"):
        client.submit(request)
    one_rate = base_n / (time.perf_counter() - t)
    t = time.perf_counter()
    client.submit_many(requests(n, "alone"))
    many_rate = n / (time.perf_counter() - t)
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


def phases(sim: SimulatorProcess, n: int, rows: list[tuple[str, str, str]]) -> None:
    """In-process phases: insert, flush, write rate, ingest."""
    from batch.flush import flush
    from batch.ingest import ingest
    from batch.jsonl import write_job_file
    from batch.poll import poll
    from lifecycle.record import record_requests
    from sheepdog.client import Client

    db = new_db()
    try:
        settings = bench_settings(db, sim, tempfile.mkdtemp(prefix="bench-batch-"))
        client = Client(settings)
        t = time.perf_counter()
        items = [client.prepare(r) for r in requests(n, "phase")]
        prepare_s = time.perf_counter() - t
        rows.append(("producer prepare() (validate, cap)", f"{n / prepare_s:,.0f} req/s", ""))
        submit_alone(settings, n, rows)
        t = time.perf_counter()
        for start in range(0, n, 500):
            with session_scope(db) as session:
                record_requests(session, items[start : start + 500])
        insert_s = time.perf_counter() - t
        rows.append(("intake bulk insert (500/msg)", f"{n / insert_s:,.0f} rows/s", ">= 5,000"))
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
        scratch = tempfile.mkdtemp(prefix="bench-jsonl-")
        t = time.perf_counter()
        lines = size = 0
        for job in report.jobs:
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
        deadline = time.monotonic() + 300
        ready: list[str] = []
        while len(ready) < len(report.jobs) and time.monotonic() < deadline:
            ready = poll(settings).to_ingest
            time.sleep(0.1)
        t = time.perf_counter()
        done = 0
        for job_id in ready:
            done += ingest(job_id, settings).succeeded
        ingest_s = time.perf_counter() - t
        rows.append(("ingest into PostgreSQL", f"{done / ingest_s:,.0f} rows/s", ">= 20,000"))
    finally:
        drop_db(db)


def round_trip(sim: SimulatorProcess, n: int, rows: list[tuple[str, str, str]]) -> None:
    """submit_many -> worker intake -> beat flush/poll -> ingest, through real processes."""
    import redis

    from sheepdog.client import Client

    db = new_db()
    redis.Redis.from_url(REDIS).flushdb()
    workdir = tempfile.mkdtemp(prefix="bench-rt-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env.update(
        SHEEPDOG_REDIS_URL=REDIS,
        SHEEPDOG_DATABASE_URL=db,
        SHEEPDOG_OPENAI_BASE_URL=sim.base_url,
        SHEEPDOG_OPENAI_API_KEY=sim.api_key,
        SHEEPDOG_BATCH_WORKDIR=workdir,
        SHEEPDOG_BATCH_FLUSH_INTERVAL_S="2",
        SHEEPDOG_BATCH_POLL_INTERVAL_S="0.5",
        SHEEPDOG_BATCH_FLUSH_THRESHOLD=str(max(n // 2, 1)),
    )
    celery = [sys.executable, "-m", "celery", "-A", "workers.app"]
    logs = Path(workdir)
    procs = [
        subprocess.Popen(
            [*celery, "worker", "-Q", "default", "-P", "prefork", "-c", "2", "-n", "intake@%h"],
            cwd=ROOT,
            env=env,
            stdout=(logs / "intake.log").open("wb"),
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [*celery, "worker", "-Q", "batch", "-P", "threads", "-c", "4", "-n", "batch@%h"],
            cwd=ROOT,
            env=env,
            stdout=(logs / "batch.log").open("wb"),
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [*celery, "beat", "--schedule", str(logs / "beat-schedule")],
            cwd=ROOT,
            env=env,
            stdout=(logs / "beat.log").open("wb"),
            stderr=subprocess.STDOUT,
        ),
    ]
    try:
        time.sleep(4)  # workers up
        settings = bench_settings(db, sim, workdir)
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
        while count(settings, status="succeeded") + count(settings, status="failed") < n:
            if time.monotonic() > deadline:
                raise TimeoutError("round trip did not finish in 600 s")
            time.sleep(0.2)
        total = time.perf_counter() - t0
        with session_scope(db) as session:
            njobs = session.scalar(select(func.count()).select_from(BatchJob))
        ok = count(settings, status="succeeded")
        rows.append(
            ("round trip (submit -> all ended)", f"{total:.1f} s", f"< 60 s; {ok} ok, {njobs} jobs")
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        drop_db(db)


MEMORY_CHILD = r"""
import json, resource, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
from pydantic import SecretStr
from core.settings import Settings
from batch.ingest import ingest
cfg = json.loads(sys.argv[2])
settings = Settings().model_copy(update={**cfg, "openai_api_key": SecretStr(cfg["openai_api_key"])})
tracemalloc.start()
t = time.perf_counter()
report = ingest(cfg["job_id"], settings)
elapsed = time.perf_counter() - t
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"peak": peak, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "ok": report.succeeded, "s": elapsed}))
"""


def memory(sim: SimulatorProcess, mb: int, rows: list[tuple[str, str, str]]) -> None:
    """Ingest an output file of `mb` MB (answers of ~4 KB) in a subprocess; its peak memory."""
    from openai import OpenAI

    from batch.claim import claim
    from batch.jobs import update_job
    from lifecycle.record import record_requests
    from sheepdog.client import Client

    db = new_db()
    try:
        workdir = tempfile.mkdtemp(prefix="bench-mem-")
        settings = bench_settings(db, sim, workdir)
        answer = "lorem ipsum dolor sit amet " * 150  # ~4 KB
        n = mb * 1_000_000 // (len(answer) + 300)
        client = Client(settings)
        items = [client.prepare(r) for r in requests(n, f"mem{mb}")]
        for start in range(0, n, 2000):
            with session_scope(db) as session:
                record_requests(session, [i for i in items[start : start + 2000]])
        with session_scope(db) as session:
            groups = claim(session, settings.model_copy(update={"batch_max_lines": 10**9})).groups
        path = Path(workdir) / "output.jsonl"
        with path.open("w") as out:
            for g in groups:
                for rid in g.ids:
                    body = {
                        "id": "chatcmpl-x",
                        "object": "chat.completion",
                        "model": g.model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 20, "completion_tokens": 900},
                    }
                    line = {
                        "id": "br",
                        "custom_id": rid,
                        "error": None,
                        "response": {"status_code": 200, "request_id": "r", "body": body},
                    }
                    out.write(json.dumps(line) + "\n")
        size = path.stat().st_size
        oai = OpenAI(base_url=sim.base_url, api_key=sim.api_key, max_retries=0, timeout=600)
        with path.open("rb") as fh:
            file_id = oai.files.create(file=(path.name, fh), purpose="batch").id
        first, *others = groups
        for g in others:  # one job holding every request, as one big output file
            with session_scope(db) as session:
                session.execute(
                    Request.__table__.update()
                    .where(Request.batch_job_id == g.job_id)
                    .values(batch_job_id=first.job_id)
                )
        update_job(
            settings,
            first.job_id,
            status="completed",
            output_file_id=file_id,
            provider_batch_id=f"batch_mem_{mb}",
        )
        cfg = {
            "database_url": db,
            "redis_url": REDIS,
            "openai_base_url": sim.base_url,
            "openai_api_key": sim.api_key,
            "batch_workdir": workdir,
            "job_id": first.job_id,
        }
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(ROOT), json.dumps(cfg)],
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            (
                f"ingest peak memory, {size / 1e6:.0f} MB output",
                f"{res['peak'] / 1e6:.1f} MB traced",
                f"max RSS {res['rss_kb'] / 1024:.0f} MB; {res['ok']:,} rows, "
                f"{res['ok'] / res['s']:,.0f} rows/s under tracemalloc",
            )
        )
        path.unlink()
    finally:
        drop_db(db)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--memory-mb", default="20,200")
    parser.add_argument("--skip", default="", help="comma list of: phases,roundtrip,memory")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rows: list[tuple[str, str, str]] = []
    config = SimulatorConfig(
        api_key="sk-bench",
        time_scale=1_000_000.0,
        batch_window_s=1e9,  # keep the 24 h window from expiring at this time scale
        answer_tokens=(20, 40),
        data_dir=tempfile.mkdtemp(prefix="bench-sim-"),
    )
    with SimulatorProcess(config) as sim:
        if "phases" not in skip:
            phases(sim, args.requests, rows)
        if "roundtrip" not in skip:
            round_trip(sim, args.requests, rows)
        if "memory" not in skip:
            for mb in (int(x) for x in args.memory_mb.split(",")):
                memory(sim, mb, rows)
    width = max(len(r[0]) for r in rows)
    print(f"\nbatch path, {args.requests:,} requests, simulator at time scale 1e6, PostgreSQL\n")
    print(f"{'measure':<{width}}  {'result':>18}  note")
    print(f"{'-' * width}  {'-' * 18}  {'-' * 30}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")


if __name__ == "__main__":
    main()
