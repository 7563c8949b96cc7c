"""Two flushes at once (PostgreSQL, threads) never put one request into two jobs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from openai import OpenAI
from sqlalchemy import func, select

from batch.flush import FlushReport, flush
from batch.provider_batch import METADATA_KEY
from core.db import session_scope
from models.tables import BatchJob, Request
from tests.fixtures.batch import add_requests, drive, make_settings, rows, wipe


def test_concurrent_flushes_claim_disjoint_rows(
    batch_pg_url: str, redis_url: str, simulator: Any, tmp_path: Path
) -> None:
    wipe(batch_pg_url)
    # Small files, so each flush makes many jobs and the claims really overlap in time.
    settings = make_settings(
        batch_pg_url, redis_url, simulator, tmp_path, batch_max_lines=50, batch_claim_limit=300
    )
    ids = add_requests(settings, [("sheepdog-mini", f"race q{i}") for i in range(1200)])
    reports: list[FlushReport] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run() -> None:
        try:
            start.wait()
            reports.append(flush(settings))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    claimed = sum(r.claimed for r in reports)
    job_ids = [j.job_id for r in reports for j in r.jobs]
    assert len(job_ids) == len(set(job_ids))
    with session_scope(settings.database_url) as session:
        per_job = dict(
            session.execute(
                select(Request.batch_job_id, func.count()).group_by(Request.batch_job_id)
            ).all()
        )
        recorded = dict(session.execute(select(BatchJob.id, BatchJob.request_count)).all())
    assert per_job == recorded  # every job holds exactly the rows it claimed
    assert sum(per_job.values()) == claimed == min(1200, 4 * 300)
    # Each job was submitted once, and the lines of all files are distinct requests.
    seen: set[str] = set()
    for job_id in job_ids:
        text = (tmp_path / f"{job_id}.jsonl").read_text()
        custom = [line.split('"custom_id":"', 1)[1].split('"', 1)[0] for line in text.splitlines()]
        assert not seen & set(custom)
        seen |= set(custom)
    provider_jobs = [
        (b.metadata or {}).get(METADATA_KEY)
        for b in OpenAI(
            base_url=settings.openai_base_url, api_key=settings.api_key(), max_retries=0
        ).batches.list(limit=100)
    ]
    for job_id in job_ids:
        assert provider_jobs.count(job_id) == 1
    drive(settings, ids, timeout=60)
    assert {r.status for r in rows(settings, ids).values()} == {"succeeded"}
