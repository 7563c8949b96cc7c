"""Benchmark of budget reservations at submit, on PostgreSQL.

Run: ``.venv/bin/python bench/bench_costs.py [--requests 5000]``.
Needs Redis and PostgreSQL (the same ones the tests use); makes a throwaway database and sends
to Redis database 12 (of SHEEPDOG_BENCH_REDIS_URL's server, default the local one), which no
worker reads (it is flushed before and after).

Rows of the table:
1. reserve(), unbudgeted tenant: the cost every submit pays when no budget applies (cached);
2. reserve(), budgeted tenant: one transaction (lock, spend, bulk insert) per submit_many call;
3. submit_many, unbudgeted: the producer end to end (prepare, reserve, send to Redis);
4. submit_many, budgeted: the same with reservations.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.bodies import low_requests  # noqa: E402
from bench.stack import redis_db  # noqa: E402
from core.db import session_scope  # noqa: E402
from core.settings import Settings  # noqa: E402
from costs.budget_limits import set_budget  # noqa: E402
from costs.budgets import reserve  # noqa: E402
from sheepdog.client import Client  # noqa: E402
from tests.fixtures.pg import create_database, drop_database  # noqa: E402

BROKER = redis_db(12)


def requests(n: int, tenant: str) -> list[dict[str, object]]:
    return low_requests(n, "summarise item {i} of the nightly run", max_tokens=200, tenant=tenant)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    n = parser.parse_args().requests
    url = create_database("sheepdog_bench")
    broker = redis.Redis.from_url(BROKER)
    try:
        broker.flushdb()
        settings = Settings(database_url=url, redis_url=BROKER)
        with session_scope(url) as session:
            set_budget(session, "paying", daily_usd=Decimal(1_000_000))
        client = Client(settings)
        free = [client.prepare(r) for r in requests(n, "free")]
        paid = [client.prepare(r) for r in requests(n, "paying")]
        client.submit_many(requests(10, "free"))  # warm the Celery app, the cache, the engine
        rows = [
            ("reserve(), unbudgeted", timed(lambda: reserve(free, settings))),
            ("reserve(), budgeted (1 txn)", timed(lambda: reserve(paid, settings))),
            ("submit_many, unbudgeted", timed(lambda: client.submit_many(requests(n, "free")))),
            ("submit_many, budgeted", timed(lambda: client.submit_many(requests(n, "paying")))),
        ]
        print(f"\n{'phase':<30} {'requests':>9} {'seconds':>9} {'req/s':>10}")
        for label, seconds in rows:
            print(f"{label:<30} {n:>9} {seconds:>9.3f} {n / seconds:>10,.0f}")
    finally:
        broker.flushdb()
        drop_database(url)


if __name__ == "__main__":
    main()
