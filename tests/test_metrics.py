"""Prometheus metrics scraped from real workers (threads and prefork pools)."""

from __future__ import annotations

import time
import urllib.request
import uuid
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from core.db import session_scope
from lifecycle.record import record_requests
from models.status import Status
from models.tables import Request, utcnow
from simulator.server import free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(
        v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab)
    )


def wait_for(port: int, check, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched; last scrape: {samples}")
        time.sleep(0.3)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_serves_task_and_database_metrics(stack, stack_client, pool: str) -> None:
    port = free_port()
    queue = f"metrics-{uuid.uuid4().hex[:6]}"  # only this worker consumes it
    proc = stack.start_worker(
        queues=queue,
        pool=pool,
        concurrency=2,
        env={"SHEEPDOG_METRICS_PORT": str(port), "SHEEPDOG_METRICS_CACHE_S": "0"},
        name=f"metrics-{pool}",
    )
    try:
        tag = uuid.uuid4().hex
        items = [
            stack_client.prepare(
                {
                    "model": "sheepdog-mini",
                    "messages": [{"role": "user", "content": f"metrics {tag} {i}"}],
                    "priority": "low",
                }
            )
            for i in range(3)
        ]
        stack_client.celery.send_task(
            "sheepdog.intake", args=[[i.model_dump(mode="json") for i in items]], queue=queue
        )
        wait_for(
            port,
            lambda s: (
                value(s, "sheepdog_tasks_total", task="sheepdog.intake", state="SUCCESS") >= 1
            ),
        )
        # A fresh scrape: a scrape queries the database before it reads the task counters, so
        # the one that first showed the task done may hold counts from before its rows were
        # committed (seen on a busy box, where the first query is slow).
        samples = scrape(port)
        assert value(samples, "sheepdog_tasks_total", task="sheepdog.intake", state="SUCCESS") >= 1
        assert value(samples, "sheepdog_task_duration_seconds_count", task="sheepdog.intake") >= 1
        assert value(samples, "sheepdog_metrics_db_up") == 1
        assert value(samples, "sheepdog_requests", route="batch", model="sheepdog-mini") >= 3
        assert ("sheepdog_requests_queued", ()) in samples
        assert ("sheepdog_batch_jobs_open", (("status", "in_progress"),)) in samples
    finally:
        proc.stop()
    assert "Traceback" not in proc.log_text()


def test_stream_histograms_from_finished_rows(stack, stack_client, pg_url: str) -> None:
    port = free_port()
    proc = stack.start_worker(
        queues=f"metrics-{uuid.uuid4().hex[:6]}",
        concurrency=1,
        env={"SHEEPDOG_METRICS_PORT": str(port)},
        name="metrics-hist",
    )
    try:
        scrape(port)  # the first scrape sets the shared mark: history is not replayed
        model = f"hist-{uuid.uuid4().hex[:6]}"
        item = stack_client.prepare(
            {"model": "sheepdog-mini", "messages": [{"role": "user", "content": model}]}
        )
        item.body["model"] = model  # a label of our own, so other tests' streams do not count
        now = utcnow()
        with session_scope(pg_url) as session:
            record_requests(session, [item])
            session.execute(
                update(Request)
                .where(Request.id == item.id)
                .values(  # a finished stream: 0.4 s to the first token, 2 s of streaming
                    status=Status.SUCCEEDED.value,
                    created_at=now - timedelta(seconds=2.6),
                    started_at=now - timedelta(seconds=2.2),
                    first_token_at=now - timedelta(seconds=2.2),
                    finished_at=now - timedelta(seconds=0.2),
                )
            )
        samples = wait_for(
            port,
            lambda s: value(s, "sheepdog_stream_duration_seconds_count", model=model) >= 1,
        )
        assert value(samples, "sheepdog_time_to_first_token_seconds_count", model=model) == 1
        assert value(samples, "sheepdog_time_to_first_token_seconds_sum", model=model) == (
            pytest.approx(0.4, abs=0.01)
        )
        assert value(samples, "sheepdog_stream_duration_seconds_sum", model=model) == (
            pytest.approx(2.0, abs=0.01)
        )
        # Counted once: later scrapes do not observe the same row again.
        time.sleep(1)
        assert value(scrape(port), "sheepdog_stream_duration_seconds_count", model=model) == 1
    finally:
        proc.stop()
