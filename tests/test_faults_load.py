"""Fault suite, load: mixed traffic (20 % high priority, the rest low) through two stream
workers and one batch worker with beat. Every request ends succeeded, the counts match, and
nothing is done twice (each request in one batch job per attempt, one ledger entry each).

2,000 requests by default (CI's budget); SHEEPDOG_FULL_LOAD=1 runs the issue's 10,000."""

from __future__ import annotations

import os
import uuid
from collections import Counter

import pytest
from sqlalchemy import select

from core.db import session_scope
from models.tables import BatchJob, CostEntry, Request
from tests.fixtures.faults import Deployment, Figures, tally, wait_final
from tests.fixtures.invariants import check_invariants

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

TOTAL = 10_000 if os.environ.get("SHEEPDOG_FULL_LOAD") == "1" else 2_000


def test_mixed_load_through_two_stream_workers_and_a_batch_worker(
    fault_deployment: Deployment, fault_figures: Figures
) -> None:
    dep = fault_deployment
    settings = dep.settings
    run = uuid.uuid4().hex[:8]
    procs = [
        dep.stream_worker("stream-a", concurrency=200),
        dep.stream_worker("stream-b", concurrency=200),
        dep.batch_worker("batch"),
        dep.stack.start_beat(name="beat"),
    ]
    client = dep.client()
    requests = [
        {
            "model": "sheepdog-mini",
            "messages": [{"role": "user", "content": f"load {run} {i}"}],
            "priority": "high" if i % 5 == 0 else "low",
            "max_tokens": 20,
        }
        for i in range(TOTAL)
    ]
    try:
        ids = client.submit_many(requests)
        rows = wait_final(settings, ids, 60 + TOTAL / 20)
    finally:
        for p in procs:
            p.stop()
    t = tally(settings, ids)
    checked = check_invariants(settings, ids)
    fault_figures.record(
        f"load: {TOTAL} mixed (20 % high)",
        t,
        "2 stream workers, 1 batch worker",
        garbled=checked.garbled,
    )
    assert t.succeeded == TOTAL and t.lost == 0, t
    routes = Counter(rows[rid].route for rid in ids)
    assert routes == {"stream": TOTAL // 5, "batch": TOTAL - TOTAL // 5}
    with session_scope(settings.database_url) as session:
        entries = Counter(
            session.scalars(select(CostEntry.request_id).where(CostEntry.request_id.in_(ids)))
        )
        per_job = Counter(
            session.scalars(
                select(Request.batch_job_id).where(
                    Request.id.in_(ids), Request.batch_job_id.is_not(None)
                )
            )
        )
        counted = dict(
            session.execute(
                select(BatchJob.id, BatchJob.ingested_count).where(BatchJob.id.in_(list(per_job)))
            ).all()
        )
    assert len(entries) == TOTAL and set(entries.values()) == {1}  # each ledger entry once
    assert all(rows[rid].attempts == 1 for rid in ids if rows[rid].route == "batch")
    assert per_job == counted  # each job ingested exactly the requests it holds
