"""Benchmark: Redis memory the replay logs hold per 1,000 streams, kept for the full TTL (before
issue 19: an hour after the end) against trimmed once the row holds the answer (now).

Run: ``.venv/bin/python bench/bench_replay_memory.py [--streams 1000] [--tokens 50]``. Starts its
own simulator, uses Redis DB 13 of SHEEPDOG_BENCH_REDIS_URL's server (flushed) and a throwaway
PostgreSQL database, and one stream worker per phase:

- baseline: SHEEPDOG_REPLAY_DONE_TTL_S = SHEEPDOG_REPLAY_TTL_S (3600): the logs stay an hour;
- trimmed: SHEEPDOG_REPLAY_DONE_TTL_S = 2 (the default is 60): the logs go 2 s after the end.

Each phase sends N streams of --tokens tokens, waits for every row to end, and reads Redis's
`used_memory` (after a settle) against the figure before the phase: held at the end (both the
same: the logs are needed while streams run) and held TTL_DONE + 3 s later. Figures are MB per
1,000 streams; the ratio is trimmed / baseline in the same run.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from bench.stack import Proc, redis_db, spawn_stream_worker, worker_env  # noqa: E402
from core.db import session_scope  # noqa: E402
from core.settings import Settings  # noqa: E402
from models.tables import Request  # noqa: E402
from sheepdog.client import Client  # noqa: E402
from simulator.config import SimulatorConfig  # noqa: E402
from simulator.server import SimulatorProcess  # noqa: E402
from tests.fixtures.pg import create_database, drop_database  # noqa: E402

REDIS = redis_db(13)
DONE_TTL_S = 2


def used(r: redis.Redis) -> int:
    time.sleep(1)  # let lazy frees and the allocator settle
    return int(r.info("memory")["used_memory"])


def wait_succeeded(db_url: str, ids: list[str], worker: Proc, name: str, log: Path) -> None:
    """Until every request has succeeded (RuntimeError after 600 s, or if the worker dies)."""
    deadline = time.monotonic() + 600
    while True:
        with session_scope(db_url) as session:
            ended = session.scalar(
                select(func.count())
                .select_from(Request)
                .where(Request.id.in_(ids), Request.status == "succeeded")
            )
        if ended == len(ids):
            return
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError(f"{name}: {ended}/{len(ids)} ended; see {log}")
        time.sleep(0.5)


def phase(
    name: str, done_ttl: int, n: int, env: dict[str, str], db_url: str, logdir: Path
) -> dict[str, float]:
    r = redis.Redis.from_url(REDIS)
    prefix = f"bmem-{name}:"
    env = {**env, "SHEEPDOG_BROKER_PREFIX": prefix, "SHEEPDOG_REPLAY_DONE_TTL_S": str(done_ttl)}
    log = logdir / f"{name}.log"
    worker = spawn_stream_worker(env, log)
    settings = Settings(
        redis_url=REDIS,
        broker_prefix=prefix,
        database_url=db_url,
        openai_base_url=env["SHEEPDOG_OPENAI_BASE_URL"],
        openai_api_key=env["SHEEPDOG_OPENAI_API_KEY"],
    )
    client = Client(settings)
    try:
        time.sleep(8)  # the worker is up and consuming (its queue is prefixed: nothing is lost)
        tag = secrets.token_hex(3)
        before = used(r)
        ids = client.submit_many(
            [
                {
                    "model": "sheepdog-mini",
                    "messages": [{"role": "user", "content": f"mem {tag} {i}"}],
                    "priority": "normal",
                }
                for i in range(n)
            ]
        )
        wait_succeeded(db_url, ids, worker, name, log)
        at_end = used(r) - before
        time.sleep(DONE_TTL_S + 2)
        later = used(r) - before
    finally:
        worker.terminate()
        worker.wait(30)
    per_1000 = 1000 / n / 1e6
    return {"at_end": at_end * per_1000, "later": later * per_1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=50)
    args = parser.parse_args()
    r = redis.Redis.from_url(REDIS)
    r.flushdb()
    db_url = create_database("sheepdog_bmem")
    config = SimulatorConfig(
        api_key="sk-bench-mem", answer_tokens=(args.tokens, args.tokens), chunk_delay_ms=10
    )
    with SimulatorProcess(config) as sim, tempfile.TemporaryDirectory() as tmp:
        env = worker_env(REDIS, db_url, sim, SHEEPDOG_METRICS_PORT="0")
        try:
            base = phase("baseline", 3600, args.streams, env, db_url, Path(tmp))
            trim = phase("trimmed", DONE_TTL_S, args.streams, env, db_url, Path(tmp))
        finally:
            drop_database(db_url)
            r.flushdb()
    print(f"\nRedis memory held by replay logs, MB per 1,000 streams of {args.tokens} tokens")
    print(f"({args.streams} streams a phase, one worker, same run)\n")
    print("| phase | at the end | 4 s later | ")
    print("|---|---:|---:|")
    print(f"| baseline (kept replay_ttl_s, 1 h) | {base['at_end']:.2f} | {base['later']:.2f} |")
    print(
        f"| trimmed (kept {DONE_TTL_S} s after the end) | {trim['at_end']:.2f} | "
        f"{trim['later']:.2f} |"
    )
    ratio = trim["later"] / base["later"] if base["later"] > 0 else float("nan")
    print(f"\ntrimmed / baseline, 4 s after the end: {ratio:.3f}")


if __name__ == "__main__":
    main()
