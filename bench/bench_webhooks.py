"""Benchmark of webhooks on PostgreSQL: what the outbox costs the batch ingest, deliveries per
second to a local receiver, and the time from a request's end to its webhook.

Run: ``.venv/bin/python bench/bench_webhooks.py [--requests 10000] [--latency 200]``.
Needs Redis (SHEEPDOG_BENCH_REDIS_URL, default redis://127.0.0.1:6379/13) and PostgreSQL.

1. ingest: the same batch ingested with no tenant using webhooks (the baseline), with another
   tenant using them (the end's INSERT ... SELECT matches nothing), and with the requests'
   own tenant subscribed (one outbox row per request, in the ingest's transactions);
2. delivery: a real `webhooks` worker (threads, 8) drains those outbox rows to a local
   receiver, one endpoint (2 slots) and eight endpoints, against the baseline of unsigned
   POSTs in a loop from one thread, straight to the receiver (no database, no Celery);
3. latency: stream requests through real workers; end (finished_at) -> webhook received,
   p50 / p99, against beat's sweep interval (what delivery would take without the kick).
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydantic import SecretStr  # noqa: E402
from sqlalchemy import func, select, update  # noqa: E402

from bench import stack  # noqa: E402
from bench.batch_steps import ingest_timed, record, wait_ingestable  # noqa: E402
from bench.bodies import low_requests  # noqa: E402
from bench.report import Measure, pct, print_measures  # noqa: E402
from core.db import session_scope  # noqa: E402
from core.settings import Settings  # noqa: E402
from models.webhook_tables import WebhookDelivery  # noqa: E402
from simulator.server import SimulatorProcess  # noqa: E402
from tests.fixtures.pg import create_database  # noqa: E402
from tests.fixtures.pg import drop_database as drop_db  # noqa: E402
from webhooks.crypto import new_key  # noqa: E402

REDIS = os.environ.get("SHEEPDOG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
KEY = new_key()
QUIET = ("--without-gossip", "--without-mingle")


class Sink:
    """A local receiver: counts messages and when each arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrived: dict[str, float] = {}  # webhook-id -> wall time first received
        self.bodies: dict[str, bytes] = {}
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                now = time.time()
                with sink.lock:
                    key = self.headers.get("webhook-id") or f"plain-{len(sink.arrived)}"
                    if key not in sink.arrived:
                        sink.arrived[key] = now
                        sink.bodies[key] = body
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def count(self) -> int:
        with self.lock:
            return len(self.arrived)


def settings_for(db: str, sim: SimulatorProcess, workdir: str) -> Settings:
    return stack.sim_settings(
        REDIS,
        db,
        sim,
        batch_workdir=workdir,
        webhook_secret_key=SecretStr(KEY),
        webhook_allow_private=True,
    )


def register(settings: Settings, tenant: str, url: str) -> str:
    from webhooks.endpoints import add_endpoint

    with session_scope(settings.database_url) as session:
        return add_endpoint(session, settings, tenant, url).endpoint.id


def ingest_rate(settings: Settings, n: int) -> float:
    """Insert n queued rows of tenant `bench`, flush, wait for the job, time the ingest."""
    from batch.flush import flush
    from sheepdog.client import Client

    client = Client(settings)
    requests = low_requests(n, "question {i}, briefly", tenant="bench")
    record(settings.database_url, [client.prepare(r) for r in requests])
    jobs = flush(settings).jobs
    done, seconds = ingest_timed(settings, wait_ingestable(settings, len(jobs)))
    return done / seconds


def ingest_phase(sim: SimulatorProcess, n: int, sink: Sink, rows: list[Measure]) -> str:
    """Returns the database of the last subscribed run (its outbox feeds the delivery phase).
    Each mode runs twice, interleaved, in a fresh database; the better run counts (the box is
    shared, so one run alone says little)."""
    rates: dict[str, float] = {}
    keep = ""
    for mode in ("none", "other", "subscribed") * 2:
        db = create_database("sheepdog_bench_wh")
        settings = settings_for(db, sim, tempfile.mkdtemp(prefix="bench-wh-"))
        if mode == "other":
            register(settings, "someone-else", sink.url)
        elif mode == "subscribed":
            register(settings, "bench", sink.url)
        rates[mode] = max(rates.get(mode, 0.0), ingest_rate(settings, n))
        if mode == "subscribed":
            if keep:
                drop_db(keep)
            keep = db
        else:
            drop_db(db)
    base = rates["none"]
    rows.append(("ingest, no webhook tenant (baseline)", f"{base:,.0f} rows/s", ""))
    rows.append(
        (
            "ingest, another tenant hooked",
            f"{rates['other']:,.0f} rows/s",
            f"x{rates['other'] / base:.2f} the baseline",
        )
    )
    rows.append(
        (
            "ingest, requests' tenant subscribed",
            f"{rates['subscribed']:,.0f} rows/s",
            f"x{rates['subscribed'] / base:.2f}; one outbox row per request",
        )
    )
    return keep


def worker_env(db: str, sim: SimulatorProcess, **extra: str) -> dict[str, str]:
    return stack.worker_env(
        REDIS,
        db,
        sim,
        SHEEPDOG_WEBHOOK_SECRET_KEY=KEY,
        SHEEPDOG_WEBHOOK_ALLOW_PRIVATE="true",
        SHEEPDOG_METRICS_PORT="0",
        SHEEPDOG_BROKER_PREFIX=f"bench-wh-{os.getpid()}:",
        **extra,
    )


def hooks_worker(env: dict[str, str], logdir: Path, name: str) -> stack.Proc:
    """A `webhooks` worker, threads pool, 8."""
    return stack.start_worker(env, logdir, name, "webhooks", "threads", 8, *QUIET)


def plain_rate(sink: Sink, n: int) -> float:
    """The floor: unsigned POSTs from one thread, a connection each (as a delivery makes)."""
    port = int(sink.url.rsplit(":", 1)[1].split("/")[0])
    t = time.perf_counter()
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/hook", body=b"{}", headers={"Content-Type": "application/json"})
        conn.getresponse().read()
        conn.close()
    return n / (time.perf_counter() - t)


def spread(db: str, settings: Settings, sink: Sink, endpoints: int) -> None:
    """The same outbox rows, pending again, spread over `endpoints` endpoints."""
    with session_scope(db) as session:
        ids = [register(settings, "bench", sink.url) for _ in range(endpoints - 1)]
        first = session.scalar(select(WebhookDelivery.endpoint_id).limit(1))
        ids.append(first or "")
        session.execute(
            update(WebhookDelivery).values(status="pending", attempts=0, leased_until=None)
        )
        for i, eid in enumerate(ids):
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id % endpoints == i)
                .values(endpoint_id=eid, target=eid)
            )


def drain_rate(
    db: str, sim: SimulatorProcess, sink: Sink, endpoints: int, total: int, logdir: Path
) -> float:
    """Messages a second a webhooks worker (and beat) delivers until `total` have arrived."""
    env = worker_env(db, sim, SHEEPDOG_WEBHOOK_SWEEP_INTERVAL_S="0.2")
    procs = [hooks_worker(env, logdir, f"hooks{endpoints}")]
    try:
        time.sleep(4)
        procs.append(stack.start_beat(env, logdir, f"beat{endpoints}"))
        t = time.perf_counter()
        deadline = time.monotonic() + 600
        while sink.count() < total and time.monotonic() < deadline:
            time.sleep(0.05)
        return sink.count() / (time.perf_counter() - t)
    finally:
        stack.stop(procs)


def delivery_phase(db: str, sim: SimulatorProcess, sink: Sink, rows: list[Measure]) -> None:
    settings = settings_for(db, sim, tempfile.mkdtemp())
    with session_scope(db) as session:
        total = int(session.scalar(select(func.count()).select_from(WebhookDelivery)) or 0)
    floor = plain_rate(sink, 500)
    rows.append(("plain POSTs, one thread (baseline)", f"{floor:,.0f} msg/s", "no DB, unsigned"))
    logdir = Path(tempfile.mkdtemp(prefix="bench-wh-logs-"))
    for endpoints in (1, 8):
        spread(db, settings, sink, endpoints)
        sink.arrived.clear()
        rate = drain_rate(db, sim, sink, endpoints, total, logdir)
        rows.append(
            (
                f"worker deliveries, {endpoints} endpoint(s)",
                f"{rate:,.0f} msg/s",
                f"{total:,} signed; x{rate / floor:.2f} the baseline",
            )
        )


def trickle(settings: Settings, prefix: str, n: int) -> None:
    """n stream requests of tenant `lat`, 20 ms apart (a steady trickle, not one burst)."""
    from sheepdog.client import Client

    client = Client(settings.model_copy(update={"broker_prefix": prefix}))
    for i in range(n):
        client.submit(
            {
                "model": "sheepdog-mini",
                "messages": [{"role": "user", "content": f"latency {i}"}],
                "max_tokens": 10,
                "metadata": {"tenant": "lat"},
            }
        )
        time.sleep(0.02)


def lags_ms(sink: Sink) -> list[float]:
    """For each webhook received: ms from its request's end (finished_at) to its arrival."""
    import orjson

    lags = []
    for key, arrived in sink.arrived.items():
        data = orjson.loads(sink.bodies[key])["data"]
        finished = datetime.fromisoformat(data["finished_at"]).replace(tzinfo=UTC)
        lags.append((arrived - finished.timestamp()) * 1000)
    return lags


def latency_phase(sim: SimulatorProcess, n: int, rows: list[Measure]) -> None:
    db = create_database("sheepdog_bench_wh")
    sink = Sink()
    settings = settings_for(db, sim, tempfile.mkdtemp())
    register(settings, "lat", sink.url)
    logdir = Path(tempfile.mkdtemp(prefix="bench-wh-lat-"))
    env = worker_env(db, sim)
    procs = [
        stack.start_worker(env, logdir, "stream", "stream,default", "threads", 50, *QUIET),
        hooks_worker(env, logdir, "hooks"),
        stack.start_beat(env, logdir),
    ]
    try:
        time.sleep(5)
        trickle(settings, env["SHEEPDOG_BROKER_PREFIX"], n)
        deadline = time.monotonic() + 120
        while sink.count() < n and time.monotonic() < deadline:
            time.sleep(0.05)
        lags = lags_ms(sink)
    finally:
        stack.stop(procs)
        drop_db(db)
    sweep_ms = Settings().webhook_sweep_interval_s * 1000
    rows.append(
        (
            "request end -> webhook, p50 / p99",
            f"{statistics.median(lags):,.0f} / {pct(lags, 0.99):,.0f} ms",
            f"{len(lags)} stream requests; beat sweep alone: up to {sweep_ms:,.0f} ms",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--latency", type=int, default=200)
    parser.add_argument("--skip", default="", help="comma list of: ingest,delivery,latency")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rows: list[Measure] = []
    sink = Sink()
    with SimulatorProcess(stack.batch_simulator()) as sim:
        db = ""
        if "ingest" not in skip:
            db = ingest_phase(sim, args.requests, sink, rows)
        try:
            if db and "delivery" not in skip:
                delivery_phase(db, sim, sink, rows)
        finally:
            if db:
                drop_db(db)
        if "latency" not in skip:
            latency_phase(sim, args.latency, rows)
    print_measures(f"webhooks, {args.requests:,} batch requests, PostgreSQL", rows)


if __name__ == "__main__":
    main()
