"""Benchmark of the emulated batch executor: does it run at the provider's configured rate?

Run: ``.venv/bin/python bench/bench_emulated.py [--rpm 6000,12000] [--seconds 20]``.
Needs Redis and PostgreSQL (the tests' ones); makes a throwaway database, starts a simulator
without Batch API endpoints, and for each configured requests-per-minute limit: queues
rpm/60 * seconds requests, flushes them (the provider's `auto` mode finds no Batch API, so the job
is emulated) and runs the executor in this process. The rate is measured from the simulator's
arrival log: (arrivals - 1) / (last - first), plus the busiest 1-second window (the limiter
allows rpm/60 + 1 at most). The last row runs two executors (two jobs, two processes) on one
provider at once: together they keep to the one limit.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from core.db import session_scope  # noqa: E402
from core.settings import Settings  # noqa: E402
from simulator.config import SimulatorConfig  # noqa: E402
from simulator.server import SimulatorProcess  # noqa: E402
from tests.fixtures.pg import create_database  # noqa: E402
from tests.fixtures.pg import drop_database as drop_db  # noqa: E402

REDIS = os.environ.get("SHEEPDOG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
MODEL = "sheepdog-mini"


def new_db() -> str:
    return create_database("sheepdog_bench")


def providers_file(sim: SimulatorProcess, name: str, rpm: int) -> str:
    path = Path(tempfile.mkdtemp(prefix="sheepdog-bench-")) / "providers.toml"
    path.write_text(
        f'[providers.{name}]\nbase_url = "{sim.base_url}"\napi_key = "{sim.api_key}"\n'
        f'batch_mode = "auto"\nrequests_per_minute = {rpm}\n'
    )
    return str(path)


def queue_job(settings: Settings, n: int, tag: str) -> str:
    """n queued low-priority rows, flushed into one emulated job; returns its id."""
    from batch.flush import flush
    from lifecycle.record import record_requests
    from sheepdog.client import Client

    client = Client(settings)
    items = [
        client.prepare(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"{tag} bench question {i}"}],
                "priority": "low",
                "max_tokens": 30,
            }
        )
        for i in range(n)
    ]
    with session_scope(settings.database_url) as session:
        record_requests(session, items)
    report = flush(settings)
    assert len(report.jobs) == 1, report.summary()
    return report.jobs[0].job_id


def _run_executor(settings_json: str, job_id: str) -> None:
    from batch.emulated_executor import emulate

    report = emulate(job_id, Settings.model_validate_json(settings_json))
    assert report.outcome == "completed", report


def arrivals(sim: SimulatorProcess) -> list[float]:
    return sorted(a["t"] for a in sim.stats()["chat_requests"])


def busiest_second(times: list[float]) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def run(sim: SimulatorProcess, db: str, rpm: int, seconds: float, executors: int) -> dict:
    name = f"bench-{secrets.token_hex(3)}"
    settings = Settings(
        database_url=db,
        redis_url=REDIS,
        broker_prefix=f"bench-emulated-{name}:",  # the flush's task message goes nowhere
        providers_file=providers_file(sim, name, rpm),
        batch_flush_threshold=0,
    )
    per_job = int(rpm / 60 * seconds / executors)
    jobs = [queue_job(settings, per_job, f"{name}-{j}") for j in range(executors)]
    sim.reset()
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_run_executor, args=(settings.model_dump_json(), job)) for job in jobs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0, "an executor failed"
    wall = time.monotonic() - started
    times = arrivals(sim)
    measured = (len(times) - 1) / (times[-1] - times[0]) * 60
    r = redis.Redis.from_url(REDIS)
    for key in r.scan_iter(f"{settings.broker_prefix}*"):
        r.delete(key)
    return {
        "rpm": rpm,
        "executors": executors,
        "lines": per_job * executors,
        "calls": len(times),
        "wall_s": wall,
        "measured_rpm": measured,
        "error_pct": (measured - rpm) / rpm * 100,
        "max_1s": busiest_second(times),
        "allowed_1s": rpm // 60 + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rpm", default="6000,12000")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    db = new_db()
    rows: list[dict[str, Any]] = []
    try:
        config = SimulatorConfig(api_key="sk-bench", no_batch_api=True)
        with SimulatorProcess(config) as sim:
            for rpm in (int(x) for x in args.rpm.split(",")):
                rows.append(run(sim, db, rpm, args.seconds, 1))
            rows.append(run(sim, db, int(args.rpm.split(",")[-1]), args.seconds, 2))
    finally:
        drop_db(db)
    head = (
        f"{'limit rpm':>9} {'executors':>9} {'lines':>6} {'calls':>6} {'wall s':>7} "
        f"{'measured rpm':>12} {'error':>7} {'max/1s':>6} {'allowed/1s':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['rpm']:>9} {r['executors']:>9} {r['lines']:>6} {r['calls']:>6} "
            f"{r['wall_s']:>7.1f} {r['measured_rpm']:>12.0f} {r['error_pct']:>6.2f}% "
            f"{r['max_1s']:>6} {r['allowed_1s']:>10}"
        )


if __name__ == "__main__":
    main()
