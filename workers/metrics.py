"""Prometheus metrics, served by each worker's main process on SHEEPDOG_METRICS_PORT.

Two sources:
- process metrics (tasks run, their duration, stream TTFT and duration) kept by the process that
  observes them; under the prefork pool they go through PROMETHEUS_MULTIPROC_DIR so the main
  process serves its children's numbers too;
- database metrics (requests by status/route/model, queued count, open batch jobs, tokens and
  cost from the ledger, documents by status) computed at scrape time by a collector, cached for
  SHEEPDOG_METRICS_CACHE_S so frequent scrapes cost one set of GROUP BY queries.

The metric objects are made lazily, once the worker has decided its pool (see workers/signals.py).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from core.settings import Settings, get_settings

log = logging.getLogger("sheepdog.metrics")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300)
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900)
OPEN_BATCH = ("preparing", "validating", "in_progress", "finalizing", "cancelling")
COMMIT_LAG_S = 5.0  # rows are read once they finished this long ago, so late commits are seen


@dataclass
class _Instruments:
    registry: Any  # holds the process metrics (single-process mode)
    multiprocess: bool
    tasks: Any
    task_seconds: Any
    ttft: Any
    stream_seconds: Any


_instruments: _Instruments | None = None
_lock = threading.Lock()
_task_started: dict[str, float] = {}


def _get() -> _Instruments:
    global _instruments
    with _lock:
        if _instruments is None:
            from prometheus_client import CollectorRegistry, Counter, Histogram

            multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
            registry = CollectorRegistry()
            target = None if multiprocess else registry
            _instruments = _Instruments(
                registry=registry,
                multiprocess=multiprocess,
                tasks=Counter(
                    "sheepdog_tasks",
                    "Celery tasks run, by name and final state",
                    ["task", "state"],
                    registry=target,
                ),
                task_seconds=Histogram(
                    "sheepdog_task_duration_seconds",
                    "Celery task run time",
                    ["task"],
                    buckets=TASK_BUCKETS,
                    registry=target,
                ),
                ttft=Histogram(
                    "sheepdog_time_to_first_token_seconds",
                    "Streamed requests: submission to first token",
                    ["model"],
                    buckets=LATENCY_BUCKETS,
                    registry=target,
                ),
                stream_seconds=Histogram(
                    "sheepdog_stream_duration_seconds",
                    "Streamed requests: start of streaming to the end",
                    ["model"],
                    buckets=LATENCY_BUCKETS,
                    registry=target,
                ),
            )
        return _instruments


# -- what other code calls -------------------------------------------------------------------


def observe_stream(ttft_s: float | None, duration_s: float | None, model: str) -> None:
    """Record one finished stream. For the streaming path to call; when it does, set
    SHEEPDOG_METRICS_STREAM_FROM_DB=false so streams are not counted twice."""
    inst = _get()
    if ttft_s is not None and ttft_s >= 0:
        inst.ttft.labels(model).observe(ttft_s)
    if duration_s is not None and duration_s >= 0:
        inst.stream_seconds.labels(model).observe(duration_s)


def task_started(task_id: str | None) -> None:
    if task_id:
        _task_started[task_id] = time.monotonic()


def task_finished(task_id: str | None, name: str, state: str | None) -> None:
    inst = _get()
    inst.tasks.labels(name, state or "UNKNOWN").inc()
    started = _task_started.pop(task_id or "", None)
    if started is not None:
        inst.task_seconds.labels(name).observe(time.monotonic() - started)


# -- the database collector ------------------------------------------------------------------


class DatabaseCollector:
    """Counts from the database at scrape time (cached), plus stream histograms fed from rows
    that finished since the previous scrape by any worker (a Redis mark hands out each time
    range once, so summing over workers counts every stream once)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cache: tuple[float, list[Any]] | None = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = 1
        try:
            if self.settings.metrics_stream_from_db:
                self._observe_finished_streams()
            families = self._families()
        except Exception as err:  # a scrape must answer even when the database does not
            log.warning("metrics: database unavailable: %s", err)
            families, up = [], 0
        yield from families
        yield GaugeMetricFamily("sheepdog_metrics_db_up", "1 when the last query worked", up)

    def _families(self) -> list[Any]:
        now = time.monotonic()
        if self._cache and now - self._cache[0] < self.settings.metrics_cache_s:
            return self._cache[1]
        families = database_families(self.settings)
        self._cache = (now, families)
        return families

    def _observe_finished_streams(self) -> None:
        from sqlalchemy import select

        from core import keys
        from core.db import session_scope
        from core.redis_conn import get_redis
        from models.status import Status
        from models.tables import Request, utcnow

        until = utcnow() - timedelta(seconds=COMMIT_LAG_S)
        previous = _claim_range(
            get_redis(self.settings.redis_url), keys.of(self.settings).metrics_stream_mark, until
        )
        if previous is None or previous >= until:
            return
        with session_scope(self.settings.database_url) as session:
            rows = session.execute(
                select(
                    Request.model,
                    Request.created_at,
                    Request.started_at,
                    Request.first_token_at,
                    Request.finished_at,
                ).where(
                    Request.route == "stream",
                    Request.status == Status.SUCCEEDED,
                    Request.finished_at > previous,
                    Request.finished_at <= until,
                )
            ).all()
        for model, created, started, first, finished in rows:
            ttft = (first - created).total_seconds() if first and created else None
            duration = (finished - started).total_seconds() if finished and started else None
            observe_stream(ttft, duration, model)


_CLAIM = """
local old = redis.call('GET', KEYS[1])
if (not old) or tonumber(ARGV[1]) > tonumber(old) then redis.call('SET', KEYS[1], ARGV[1]) end
return old
"""


def _claim_range(client: Any, key: str, until: datetime) -> datetime | None:
    """Move the shared mark forward to `until`; the previous mark, None on the first call ever
    (history before it is not replayed)."""
    from datetime import UTC

    old = client.eval(_CLAIM, 1, key, f"{until.timestamp():.6f}")
    return datetime.fromtimestamp(float(old), UTC) if old is not None else None


def database_families(settings: Settings) -> list[Any]:
    """The database metrics, as Prometheus metric families (one set of GROUP BY queries)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from sqlalchemy import func, select

    from core.db import session_scope
    from costs.budget_usage import used_ratios
    from models.tables import BatchJob, CostEntry, Document, Request, utcnow

    requests = GaugeMetricFamily(
        "sheepdog_requests",
        "Requests by status, route and model",
        labels=["status", "route", "model"],
    )
    queued = GaugeMetricFamily("sheepdog_requests_queued", "Requests waiting (status queued)")
    jobs = GaugeMetricFamily(
        "sheepdog_batch_jobs_open", "Open batch jobs by status", labels=["status"]
    )
    tokens = CounterMetricFamily(
        "sheepdog_tokens", "Tokens billed, from the cost ledger", labels=["route", "model", "kind"]
    )
    cost = CounterMetricFamily(
        "sheepdog_cost_usd", "Cost in USD, from the cost ledger", labels=["route", "model"]
    )
    standard = CounterMetricFamily(
        "sheepdog_standard_cost_usd",
        "What the same usage costs at the standard (streaming) rate",
        labels=["route", "model"],
    )
    docs = GaugeMetricFamily("sheepdog_documents", "Documents by status", labels=["status"])
    oldest = GaugeMetricFamily(
        "sheepdog_batch_job_oldest_open_seconds",
        "Age of the oldest open batch job (since submission, else creation); 0 when none",
    )
    budgets = GaugeMetricFamily(
        "sheepdog_budget_used_ratio",
        "A budgeted tenant's spend plus held reservations over its limit, per UTC period",
        labels=["tenant", "period"],
    )
    with session_scope(settings.database_url) as session:
        waiting = 0
        for status, route, model, n in session.execute(
            select(Request.status, Request.route, Request.model, func.count()).group_by(
                Request.status, Request.route, Request.model
            )
        ):
            requests.add_metric([status, route, model], n)
            waiting += n if status == "queued" else 0
        queued.add_metric([], waiting)
        open_jobs = dict.fromkeys(OPEN_BATCH, 0)
        for status, n in session.execute(
            select(BatchJob.status, func.count())
            .where(BatchJob.status.in_(OPEN_BATCH))
            .group_by(BatchJob.status)
        ):
            open_jobs[status] = n
        for status, n in open_jobs.items():
            jobs.add_metric([status], n)
        since = session.scalar(
            select(func.min(func.coalesce(BatchJob.submitted_at, BatchJob.created_at))).where(
                BatchJob.status.in_(OPEN_BATCH)
            )
        )
        oldest.add_metric([], (utcnow() - since).total_seconds() if since else 0.0)
        for tenant, period, ratio in used_ratios(session, settings):
            budgets.add_metric([tenant, period], ratio)
        for route, model, p, c, usd, std in session.execute(
            select(
                CostEntry.route,
                CostEntry.model,
                func.sum(CostEntry.prompt_tokens),
                func.sum(CostEntry.completion_tokens),
                func.sum(CostEntry.cost_usd),
                func.sum(CostEntry.standard_cost_usd),
            ).group_by(CostEntry.route, CostEntry.model)
        ):
            tokens.add_metric([route, model, "prompt"], float(p or 0))
            tokens.add_metric([route, model, "completion"], float(c or 0))
            cost.add_metric([route, model], float(usd or 0))
            standard.add_metric([route, model], float(std or 0))
        for status, n in session.execute(
            select(Document.status, func.count()).group_by(Document.status)
        ):
            docs.add_metric([status], n)
        from webhooks.stats import webhook_families

        hooks = webhook_families(session)
    return [requests, queued, jobs, tokens, cost, standard, docs, oldest, budgets, *hooks]


# -- serving ---------------------------------------------------------------------------------


class _Forward:
    """Yields the process metrics of a registry (single-process mode)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        yield from self.registry.collect()


def exposition_registry(settings: Settings | None = None) -> Any:
    """The registry a worker serves: database metrics first (their collection feeds the stream
    histograms), then the process metrics of this worker and, under prefork, of its children."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    inst = _get()
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(settings or get_settings()))  # type: ignore[arg-type]
    if inst.multiprocess:
        MultiProcessCollector(registry)
    else:
        registry.register(_Forward(inst.registry))  # type: ignore[arg-type]
    return registry


def prepare_multiprocess(prefork: bool) -> None:
    """Under prefork, give the metrics a directory shared
    with the children (a fresh one, or SHEEPDOG's own PROMETHEUS_MULTIPROC_DIR wiped)."""
    if not prefork:
        return
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            with contextlib.suppress(OSError):
                os.remove(stale)
    else:
        path = tempfile.mkdtemp(prefix="sheepdog-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        atexit.register(shutil.rmtree, path, True)
    # prometheus_client picks its value class when first imported, and the celery command may
    # have imported it already (Flower's plugin does): pick again now that the directory is set.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


def start_exporter(settings: Settings | None = None, *, prefork: bool = False) -> int | None:
    """Serve /metrics on settings.metrics_port in a thread; returns the port, or None when
    disabled (port 0) or taken (another worker on this host serves it; logged, not fatal)."""
    settings = settings or get_settings()
    if not settings.metrics_port:
        return None
    prepare_multiprocess(prefork)
    from prometheus_client import start_http_server

    try:
        start_http_server(
            settings.metrics_port,
            addr=settings.metrics_address,
            registry=exposition_registry(settings),
        )
    except OSError as err:
        log.warning("metrics: port %s not available (%s); not serving", settings.metrics_port, err)
        return None
    log.info("metrics on http://%s:%s/metrics", settings.metrics_address, settings.metrics_port)
    return settings.metrics_port


def process_exited(pid: int) -> None:
    """A prefork child exited: fold its live gauges away (counters and histograms stay)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
