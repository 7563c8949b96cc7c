"""Steps of the batch path the batch benches time in-process: rows recorded as the intake
worker records them, and the jobs' output ingested once the simulator has finished them."""

from __future__ import annotations

import time
from typing import Any

from core.db import session_scope
from core.settings import Settings


def record(db: str, items: list[Any], per_message: int = 500) -> None:
    """Write the prepared requests' rows, `per_message` to a transaction (as intake does)."""
    from lifecycle.record import record_requests

    for start in range(0, len(items), per_message):
        with session_scope(db) as session:
            record_requests(session, items[start : start + per_message])


def wait_ingestable(settings: Settings, jobs: int, timeout_s: float = 300) -> list[str]:
    """The ids of the jobs ready to ingest, once there are `jobs` (or the timeout passed)."""
    from batch.poll import poll

    deadline = time.monotonic() + timeout_s
    ready: list[str] = []
    while len(ready) < jobs and time.monotonic() < deadline:
        ready = poll(settings).to_ingest
        time.sleep(0.1)
    return ready


def ingest_timed(settings: Settings, job_ids: list[str]) -> tuple[int, float]:
    """Ingest the jobs one after another: (requests succeeded, seconds taken)."""
    from batch.ingest import ingest

    t = time.perf_counter()
    done = sum(ingest(job_id, settings).succeeded for job_id in job_ids)
    return done, time.perf_counter() - t
