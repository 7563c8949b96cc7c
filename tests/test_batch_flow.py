"""The batch path through its plain functions: flush, poll, ingest against the simulator, on
SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from sqlalchemy import func, select, update

from batch.flush import flush
from batch.ingest import ingest
from batch.jobs import SimulatedCrash
from batch.poll import poll
from batch.provider_batch import METADATA_KEY, find_provider_batch
from core.db import session_scope
from models.tables import BatchJob, CostEntry
from rules.prices import price_table
from tests.fixtures.batch import add_requests, drive, jobs, make_settings, rows

MINI = "sheepdog-mini"
OTHER = "gpt-4.1-mini"


@pytest.fixture
def settings(batch_db: str, redis_url: str, simulator: Any, tmp_path: Path) -> Any:
    return make_settings(batch_db, redis_url, simulator, tmp_path)


def test_thousand_requests_two_models(settings: Any) -> None:
    prompts = [(MINI if i % 2 else OTHER, f"two-models q{i}") for i in range(1000)]
    ids = add_requests(settings, prompts)
    report = flush(settings)
    assert report.claimed == 1000 and len(report.jobs) >= 2
    assert {j.model for j in report.jobs} == {MINI, OTHER}
    for job in report.jobs:  # one model per file, each line valid
        lines = (Path(settings.batch_workdir) / f"{job.job_id}.jsonl").read_text().splitlines()
        assert {json.loads(x)["body"]["model"] for x in lines} == {job.model}
    drive(settings, ids, flush=False)
    got = rows(settings, ids)
    prices = price_table()
    assert {r.status for r in got.values()} == {"succeeded"}
    for r in got.values():
        assert r.text and r.attempts == 1 and not r.usage_estimated
        assert r.cost_usd == prices.cost(r.model, r.prompt_tokens, r.completion_tokens, "batch")
    with session_scope(settings.database_url) as session:
        ledger = session.execute(
            select(func.count(), func.sum(CostEntry.cost_usd)).where(CostEntry.route == "batch")
        ).one()
        job_cost = session.scalar(select(func.sum(BatchJob.cost_usd)))
    assert ledger[0] == 1000
    assert ledger[1] == job_cost == sum(r.cost_usd for r in got.values())

    # Ingesting the same files again changes nothing.
    first = jobs(settings)[0]
    with session_scope(settings.database_url) as session:
        session.execute(update(BatchJob).where(BatchJob.id == first.id).values(ingested_at=None))
    again = ingest(first.id, settings)
    assert (again.succeeded, again.failed, again.requeued) == (0, 0, 0)
    assert again.cost_usd == first.cost_usd
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(CostEntry)) == 1000


def test_split_at_small_limits(settings: Any) -> None:
    settings = settings.model_copy(update={"batch_max_lines": 7, "batch_max_bytes": 2_000})
    ids = add_requests(settings, [(MINI, f"split q{i} " + "x" * (i % 50)) for i in range(40)])
    report = flush(settings)
    assert report.claimed == 40
    for job in report.jobs:
        path = Path(settings.batch_workdir) / f"{job.job_id}.jsonl"
        assert len(path.read_text().splitlines()) <= 7
        assert path.stat().st_size <= 2_000
    assert sum(j.lines for j in report.jobs) == 40 and len(report.jobs) >= 40 // 7 + 1
    drive(settings, ids, flush=False)
    assert {r.status for r in rows(settings, ids).values()} == {"succeeded"}


def test_validation_failure_fails_named_line_retries_rest(settings: Any, simulator: Any) -> None:
    simulator.set_faults([{"batch": "fail_validation", "match": "valfail", "first": 1}])
    ids = add_requests(settings, [(MINI, f"valfail q{i}") for i in range(10)])
    flush(settings)
    drive(settings, ids)
    got = rows(settings, ids)
    failed = [r for r in got.values() if r.status == "failed"]
    assert len(failed) == 1 and "failed validation (simulated)" in (failed[0].error or "")
    assert sum(r.status == "succeeded" for r in got.values()) == 9
    assert {r.attempts for r in got.values() if r.status == "succeeded"} == {2}


def test_expiry_with_partial_output_then_next_batch(settings: Any, simulator: Any) -> None:
    simulator.set_faults([{"batch": "expire", "after_lines": 4, "match": "expire", "first": 1}])
    ids = add_requests(settings, [(MINI, f"expire q{i}") for i in range(12)])
    flush(settings)
    drive(settings, ids)
    got = rows(settings, ids)
    assert {r.status for r in got.values()} == {"succeeded"}
    assert sorted(r.attempts for r in got.values()) == [1] * 4 + [2] * 8
    statuses = sorted(j.status for j in jobs(settings))
    assert statuses == ["completed", "expired"]


def test_error_lines_fail_with_provider_reason(settings: Any, simulator: Any) -> None:
    simulator.set_faults([{"batch": "error_lines", "match": "badline"}])
    good = add_requests(settings, [(MINI, f"errlines fine {i}") for i in range(5)])
    bad = add_requests(settings, [(MINI, f"errlines badline {i}") for i in range(3)])
    drive(settings, good + bad)
    got = rows(settings, good + bad)
    assert {got[i].status for i in good} == {"succeeded"}
    for i in bad:
        assert got[i].status == "failed" and got[i].text is None
        assert got[i].error == "invalid_value: Simulated invalid request in a batch line."


def test_lost_lines_retried_then_failed(settings: Any, simulator: Any) -> None:
    settings = settings.model_copy(update={"batch_max_attempts": 2})
    simulator.set_faults([{"batch": "lose_lines", "match": "lostline"}])
    lost = add_requests(settings, [(MINI, f"lostline {i}") for i in range(3)])
    fine = add_requests(settings, [(MINI, f"kept {i}") for i in range(3)])
    drive(settings, lost + fine)
    got = rows(settings, lost + fine)
    assert {got[i].status for i in fine} == {"succeeded"}
    for i in lost:
        assert got[i].status == "failed" and got[i].attempts == 2
        assert "no result line" in (got[i].error or "") and "gave up" in (got[i].error or "")


def test_cancelled_batch_requeues(settings: Any, simulator: Any) -> None:
    simulator.configure(batch_validate_s=3000.0)  # 3 s at the session's time scale
    ids = add_requests(settings, [(MINI, f"cancel q{i}") for i in range(6)])
    report = flush(settings)
    OpenAI(
        base_url=settings.openai_base_url, api_key=settings.api_key(), max_retries=0
    ).batches.cancel(report.jobs[0].provider_batch_id)
    simulator.configure(batch_validate_s=10.0)
    drive(settings, ids)
    got = rows(settings, ids)
    assert {r.status for r in got.values()} == {"succeeded"}
    assert {r.attempts for r in got.values()} == {2}
    assert jobs(settings)[0].status == "cancelled"


def test_max_wait_cancels_then_gives_up(settings: Any, simulator: Any) -> None:
    settings = settings.model_copy(update={"batch_max_wait_s": 0.0, "batch_max_attempts": 1})
    simulator.configure(batch_validate_s=3000.0)
    ids = add_requests(settings, [(MINI, f"maxwait q{i}") for i in range(4)])
    flush(settings)
    report = poll(settings)
    assert len(report.cancelled) == 1
    drive(settings, ids, flush=False)
    got = rows(settings, ids)
    assert {r.status for r in got.values()} == {"failed"}
    assert all("cancelled" in (r.error or "") for r in got.values())


@pytest.mark.parametrize("point", ["claim", "write", "upload", "create"])
def test_crash_is_repaired_without_double_submit(settings: Any, point: str) -> None:
    ids = add_requests(settings, [(MINI, f"crash-{point} q{i}") for i in range(8)])
    with pytest.raises(SimulatedCrash):
        flush(settings, crash_after=point)
    (job,) = jobs(settings)
    assert job.status == "preparing"
    assert {r.status for r in rows(settings, ids).values()} == {"batched"}
    repaired = flush(settings)
    assert repaired.repaired == 1 and repaired.jobs[0].adopted == (point == "create")
    client = OpenAI(base_url=settings.openai_base_url, api_key=settings.api_key(), max_retries=0)
    matching = [
        b for b in client.batches.list(limit=100) if (b.metadata or {}).get(METADATA_KEY) == job.id
    ]
    assert len(matching) == 1  # never submitted twice
    assert find_provider_batch(client, job.id, job.created_at) is not None
    drive(settings, ids, flush=False)
    assert {r.status for r in rows(settings, ids).values()} == {"succeeded"}


def test_a_create_that_lands_after_a_repair_is_cancelled(settings: Any, simulator: Any) -> None:
    """A submitter whose create was on the way when its lock lapsed (it stalled, or Redis lost
    the lock) while a repairer found no batch and made one: both batches ran, the provider
    billed the job twice, and only the recorded one was ingested. The late one is cancelled."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    from batch.flush import submit_job

    ids = add_requests(settings, [(MINI, f"late create q{i}") for i in range(3)])
    with pytest.raises(SimulatedCrash):
        flush(settings, crash_after="upload")  # a job preparing, its file uploaded
    (job,) = jobs(settings)
    release = threading.Event()
    upstream = settings.openai_base_url.rstrip("/")

    class Holding(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.do_POST()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.command == "POST" and self.path.endswith("/batches"):
                release.wait(30)  # the create is on the way, and stays there
            skip = {"host", "content-length", "connection", "accept-encoding"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
            answer = httpx.request(
                self.command,
                upstream + self.path.removeprefix("/v1"),
                content=body,
                headers=headers,
                timeout=30,
            )
            self.send_response(answer.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def log_message(self, *args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Holding)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    slow = settings.model_copy(
        update={"openai_base_url": f"http://127.0.0.1:{proxy.server_port}/v1"}
    )
    late: list[Any] = []
    submitter = threading.Thread(target=lambda: late.append(submit_job(slow, job.id, fresh=True)))
    validate_s = simulator.configure()["batch_validate_s"]
    simulator.configure(batch_validate_s=3600)  # both batches still open when the late one lands
    try:
        submitter.start()
        assert flush(settings).repaired == 1  # its lock is free: the repairer finds no batch
        release.set()
        submitter.join(60)
    finally:
        simulator.configure(batch_validate_s=validate_s)
        release.set()
        proxy.shutdown()
        proxy.server_close()
    assert late == [None], "the late create is not reported as the job's submission"
    client = OpenAI(base_url=settings.openai_base_url, api_key=settings.api_key(), max_retries=0)
    ours = [
        b for b in client.batches.list(limit=100) if (b.metadata or {}).get(METADATA_KEY) == job.id
    ]
    (recorded,) = jobs(settings)
    assert len(ours) == 2
    assert {b.status for b in ours if b.id != recorded.provider_batch_id} <= {
        "cancelling",
        "cancelled",
    }
    assert {r.status for r in rows(settings, ids).values()} == {"batched"}  # in the recorded one


def test_deadline_escalates_at_flush(settings: Any) -> None:
    from datetime import UTC, datetime, timedelta

    due = (datetime.now(UTC) + timedelta(hours=30)).isoformat()
    ids = add_requests(settings, [(MINI, "deadline soon")], deadline=due)
    later = add_requests(settings, [(MINI, "no deadline")])
    report = flush(settings.model_copy(update={"batch_window_s": 40 * 3600}))
    assert report.escalated == 1 and report.claimed == 1
    got = rows(settings, ids + later)
    assert (got[ids[0]].route, got[ids[0]].escalated, got[ids[0]].status) == (
        "stream",
        True,
        "queued",
    )
    assert got[later[0]].status == "batched"
    drive(settings, later, flush=False)
