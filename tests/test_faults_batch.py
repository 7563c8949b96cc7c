"""Fault suite, batch path: processes SIGKILLed in the middle of a flush (after the claim, after
the upload, after the provider batch was created) and of an ingest, beat killed and two beats at
once, the provider's batch faults, and the janitor's sweep of orphaned `batched` rows.

The kills at exact points run the real flush/ingest code in a subprocess whose crash hook (the
batch code's `crash_point`, or the end of an ingest transaction) SIGKILLs the process itself:
it dies holding the job's lock, with its work half done, as a killed worker would."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from openai import OpenAI
from sqlalchemy import delete, func, select, update

from batch.claim import claim
from batch.flush import flush
from batch.ingest import ingest
from batch.jobs import SimulatedCrash
from batch.poll import poll
from batch.provider_batch import METADATA_KEY, find_provider_batch
from core.db import session_scope
from core.settings import Settings
from lifecycle.record import record_requests
from models.tables import BatchJob, CostEntry, Request, utcnow
from tests.fixtures.faults import Deployment, Figures, load_rows, tally, wait_final, wait_for
from tests.fixtures.invariants import check_invariants
from tests.fixtures.workers import ROOT

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

FLUSH_HARNESS = """
import os, signal, sys
import batch.flush as f
point, claimed = sys.argv[1], []
# Die at the point in this flush's own new job, not while it repairs an earlier killed one
# (their locks expire when the test runs slowly).
take = f.claim
def claim(*args, **kwargs):
    claimed.append(1)
    return take(*args, **kwargs)
def crash_point(crash_after, here):
    if here == point and claimed:
        os.kill(os.getpid(), signal.SIGKILL)
f.claim = claim
f.crash_point = crash_point
f.flush()
"""

INGEST_HARNESS = """
import os, signal, sys, threading
import batch.ingest as ing
import batch.sink as sink
after, done, lock = int(sys.argv[2]), [0], threading.Lock()
commit = sink.Sink._transaction
def _transaction(self, pending):
    commit(self, pending)
    with lock:
        done[0] += 1
        if done[0] >= after:
            os.kill(os.getpid(), signal.SIGKILL)
sink.Sink._transaction = _transaction
ing.ingest(sys.argv[1])
"""


def low(text: str, model: str = "sheepdog-mini") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "priority": "low",
        "max_tokens": 30,
    }


def add_rows(dep: Deployment, texts: list[str], model: str = "sheepdog-mini") -> list[str]:
    """Queued batch rows, as the intake worker records them."""
    client = dep.client()
    items = [client.prepare(low(t, model)) for t in texts]
    with session_scope(dep.settings.database_url) as session:
        record_requests(session, items)
    return [item.id for item in items]


def killed(dep: Deployment, script: str, *args: str, **env: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env={**dep.env, **env},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr.decode()[-3000:]


def job_of(dep: Deployment, rid: str) -> BatchJob:
    with session_scope(dep.settings.database_url) as session:
        job_id = session.scalar(select(Request.batch_job_id).where(Request.id == rid))
        job = session.get(BatchJob, job_id)
        assert job is not None
        return job


def assert_once_each(dep: Deployment, ids: list[str]) -> None:
    """Each job has one provider batch; a request went to the provider once per batch attempt
    (a claim counts one: two jobs holding it at once would show as more); each succeeded
    request has one ledger entry."""
    settings = dep.settings
    rows = load_rows(settings, ids)
    with session_scope(settings.database_url) as session:
        our_jobs = set(session.scalars(select(BatchJob.id)))
        entries = Counter(
            session.scalars(select(CostEntry.request_id).where(CostEntry.request_id.in_(ids)))
        )
    sdk = OpenAI(base_url=settings.openai_base_url, api_key=settings.api_key(), max_retries=0)
    per_job: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    for batch in sdk.batches.list(limit=100):
        job = (batch.metadata or {}).get(METADATA_KEY)
        if job not in our_jobs:
            continue
        per_job[job] += 1
        for line in sdk.files.content(batch.input_file_id).text.splitlines():
            if line.strip():
                sent[line.split('"custom_id":"', 1)[1].split('"', 1)[0]] += 1
    sdk.close()
    assert all(n == 1 for n in per_job.values()), per_job.most_common(3)
    extra = [rid for rid in ids if sent[rid] != rows[rid].attempts]
    assert not extra, f"{len(extra)} requests sent more often than claimed, e.g. {extra[0]}"
    assert all(entries[rid] == (rows[rid].status == "succeeded") for rid in ids)


def test_batch_processes_killed_mid_flush_and_mid_ingest(
    fault_deployment: Deployment, fault_figures: Figures
) -> None:
    dep = fault_deployment
    settings = dep.settings
    run = uuid.uuid4().hex[:8]

    # An ingest killed after 3 of its transactions (50 results each).
    ingest_ids = add_rows(dep, [f"ingest {run} {i}" for i in range(400)])
    flush(settings)
    job_id = job_of(dep, ingest_ids[0]).id
    wait_for(lambda: job_id in poll(settings).to_ingest, 30, "the batch to complete")
    killed(dep, INGEST_HARNESS, job_id, "3", SHEEPDOG_BATCH_INGEST_CHUNK="50")
    half = tally(settings, ingest_ids)
    assert 0 < half.succeeded < 400 and job_of(dep, ingest_ids[0]).ingested_at is None

    # Flushes killed after the claim, after the upload, after the provider batch was created.
    points = {}
    for point in ("claim", "upload", "create"):
        points[point] = add_rows(dep, [f"flush {point} {run} {i}" for i in range(30)])
        killed(dep, FLUSH_HARNESS, point)
        job = job_of(dep, points[point][0])
        assert job.status == "preparing" and job.provider_batch_id is None
        assert (job.input_file_id is None) == (point in ("claim", "upload"))

    worker = dep.batch_worker("batch-heir")
    beat = dep.stack.start_beat(name="batch-beat")
    everything = ingest_ids + [rid for ids in points.values() for rid in ids]
    try:
        wait_final(settings, everything, 90)
    finally:
        beat.stop()
        worker.stop()
    t = tally(settings, ingest_ids)
    fault_figures.record("batch worker SIGKILLed mid-ingest (resumed)", t, "after 150 of 400")
    assert t.succeeded == 400 and t.lost == 0, t
    job = job_of(dep, ingest_ids[0])
    assert job.id == job_id and job.ingested_at is not None
    assert job.ingested_count == 400 and job.cost_usd is not None and job.cost_usd > 0
    for point, ids in points.items():
        t = tally(settings, ids)
        fault_figures.record(f"batch flush SIGKILLed after {point}", t, "repaired by poll/flush")
        assert t.succeeded == len(ids) and t.lost == 0, (point, t)
    assert_once_each(dep, everything)
    check_invariants(settings, everything)


def test_dead_ingest_is_noticed_within_seconds(
    fault_deployment: Deployment, fault_figures: Figures
) -> None:
    """An ingest SIGKILLed holding the job lock, with the deployment's own lock TTL (not the
    suite's fast one): the lock's heartbeat stops with it, so the next poll's ingest takes the
    job over within seconds instead of after the old 15-minute TTL."""
    dep = fault_deployment
    settings = dep.settings
    run = uuid.uuid4().hex[:8]
    default_ttl = str(Settings.model_fields["batch_lock_ttl_s"].default)
    ids = add_rows(dep, [f"dead ingest {run} {i}" for i in range(200)])
    flush(settings)
    job_id = job_of(dep, ids[0]).id
    wait_for(lambda: job_id in poll(settings).to_ingest, 30, "the batch to complete")
    killed(
        dep,
        INGEST_HARNESS,
        job_id,
        "2",
        SHEEPDOG_BATCH_INGEST_CHUNK="50",
        SHEEPDOG_BATCH_LOCK_TTL_S=default_ttl,
    )
    killed_at = time.monotonic()
    worker = dep.batch_worker("ingest-heir", SHEEPDOG_BATCH_LOCK_TTL_S=default_ttl)
    beat = dep.stack.start_beat(name="ingest-beat", env={"SHEEPDOG_BATCH_LOCK_TTL_S": default_ttl})
    try:
        wait_final(settings, ids, 60)
        stuck = time.monotonic() - killed_at
    finally:
        beat.stop()
        worker.stop()
    t = tally(settings, ids)
    checked = check_invariants(settings, ids)
    fault_figures.record(
        "batch worker SIGKILLed mid-ingest, the deployment's own lock TTL",
        t,
        f"after 100 of 200; lock TTL {float(default_ttl):g} s renewed by a heartbeat",
        garbled=checked.garbled,
        stuck_s=stuck,
    )
    assert t.succeeded == len(ids) and t.lost == 0, t
    assert job_of(dep, ids[0]).ingested_count == len(ids)


def test_two_beats_and_a_killed_beat_flush_each_request_once(
    fault_deployment: Deployment, fault_figures: Figures
) -> None:
    dep = fault_deployment
    settings = dep.settings
    run = uuid.uuid4().hex[:8]
    worker = dep.batch_worker("two-beats")
    beats = [dep.stack.start_beat(name=f"beat-{n}") for n in "ab"]
    client = dep.client()
    ids: list[str] = []
    try:
        for wave in range(6):  # traffic arrives while both beats fire flushes every second
            ids += client.submit_many([low(f"beats {run} {wave} {i}") for i in range(100)])
            if wave == 2:
                beats[0].kill()  # SIGKILL one beat; the other carries on alone
            time.sleep(0.5)
        wait_final(settings, ids, 90)
    finally:
        for proc in [*beats, worker]:
            proc.stop()
    t = tally(settings, ids)
    fault_figures.record("two beats at once, one SIGKILLed", t, "600 low-priority requests")
    assert t.succeeded == len(ids) and t.lost == 0, t
    assert_once_each(dep, ids)
    check_invariants(settings, ids)


# (name, model, rule, requests, how many fail, their reason): batch-wide rules pick a batch by
# model, so each fault gets a model (hence a job) of its own. The rest must succeed.
BATCH_FAULTS: list[tuple[str, str, dict[str, Any], int, int, str]] = [
    ("batch expires half-way once", "gpt-4.1-mini", {"batch": "expire", "first": 1}, 20, 0, ""),
    # The provider names line 1 invalid: that request fails with its reason, the rest go again.
    ("batch fails validation once", "claude-sonnet-4.5", {"batch": "fail_validation", "first": 1},
     20, 1, "batch validation"),
    ("batch loses half its lines once", "gemini-2.5-flash",
     {"batch": "lose_lines", "first": 1, "probability": 0.5}, 20, 0, ""),
    ("error lines (400)", "deepseek-v3.2", {"batch": "error_lines"}, 10, 10, "invalid_value"),
    ("batch expires every time", "gpt-4.1", {"batch": "expire", "after_lines": 0}, 10, 10,
     "gave up after 3 batch attempts"),
]  # fmt: skip


def test_provider_batch_faults_end_as_the_policy_says(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    dep = fault_deployment
    settings = dep.settings
    run = uuid.uuid4().hex[:8]
    simulator.set_faults(
        [
            {"match": f"bf{i} {run}", "model": fault[1], **fault[2]}
            for i, fault in enumerate(BATCH_FAULTS)
        ]
    )
    worker = dep.batch_worker("batch-faults")
    beat = dep.stack.start_beat(name="batch-faults-beat")
    client = dep.client()
    groups = {}
    try:
        for i, (name, model, _, n, _, _) in enumerate(BATCH_FAULTS):
            groups[name] = client.submit_many([low(f"bf{i} {run} q{k}", model) for k in range(n)])
        rows = wait_final(settings, [rid for ids in groups.values() for rid in ids], 120)
    finally:
        beat.stop()
        worker.stop()
    for name, _, _, n, failures, reason in BATCH_FAULTS:
        ids = groups[name]
        t = tally(settings, ids)
        note = "batch; requeued, then answered" if failures < n else f"batch; fails: {reason}"
        if 0 < failures < n:
            note += f"; {failures} failed: {reason}"
        fault_figures.record(f"provider: {name}", t, note)
        assert t.lost == 0, (name, t)
        assert (t.succeeded, t.failed) == (n - failures, failures), (name, t)
        failed = [rid for rid in ids if rows[rid].status == "failed"]
        assert all(reason in (rows[rid].error or "") for rid in failed), (name, t.reasons)
        if failures < n:
            assert max(rows[rid].attempts for rid in ids) >= 2, name  # went round again
    assert_once_each(dep, [rid for ids in groups.values() for rid in ids])
    check_invariants(settings, [rid for ids in groups.values() for rid in ids])


def test_janitor_takes_back_orphaned_batched_rows(
    fault_deployment: Deployment, fault_figures: Figures
) -> None:
    dep = fault_deployment
    settings = dep.settings
    run = uuid.uuid4().hex[:8]
    no_job = add_rows(dep, [f"orphan nojob {run} {i}" for i in range(10)])
    ingested = add_rows(dep, [f"orphan ingested {run} {i}" for i in range(10)], "gpt-4.1-mini")
    spent = add_rows(dep, [f"orphan spent {run} {i}" for i in range(5)], "gpt-4.1")
    long_ago = utcnow() - timedelta(seconds=30)
    with session_scope(settings.database_url) as session:
        # Claimed into jobs, then (same transaction, so no flush sees them in between) left
        # with a job that is gone, a job already ingested, or no attempts left.
        jobs = {g.model: g.job_id for g in claim(session, settings).groups}
        session.execute(delete(BatchJob).where(BatchJob.id == jobs["sheepdog-mini"]))
        session.execute(
            update(BatchJob)
            .where(BatchJob.id.in_([jobs["gpt-4.1-mini"], jobs["gpt-4.1"]]))
            .values(status="completed", ingested_at=long_ago, finished_at=long_ago)
        )
        session.execute(update(Request).where(Request.id.in_(spent)).values(attempts=3))
        session.execute(
            update(Request)
            .where(Request.id.in_(no_job + ingested + spent))
            .values(updated_at=long_ago)
        )
    worker = dep.batch_worker("orphans")
    beat = dep.stack.start_beat(name="orphans-beat")
    try:
        rows = wait_final(settings, no_job + ingested + spent, 60)
    finally:
        beat.stop()
        worker.stop()
    t = tally(settings, no_job + ingested)
    fault_figures.record("batched rows whose job is gone or ingested", t, "janitor requeues")
    assert t.succeeded == 20 and t.lost == 0, t
    t = tally(settings, spent)
    fault_figures.record("the same, attempts used up", t, "janitor fails them")
    assert t.failed == 5 and t.lost == 0, t
    assert all("gave up after 3 batch attempts" in (rows[r].error or "") for r in spent)
    with session_scope(settings.database_url) as session:
        assert not session.scalar(
            select(func.count()).select_from(Request).where(Request.status == "batched")
        )


def test_adopted_batch_that_already_ended_is_ingested_not_sent_again(
    fault_deployment: Deployment,
) -> None:
    """Regression: a submitter died after creating the provider batch; by the time the repair
    adopted it, the batch had completed. The job was recorded without its output file, so the
    ingest found no line and requeued every request: each was sent (and paid for) twice."""
    settings = fault_deployment.settings
    ids = add_rows(fault_deployment, [f"adopt {uuid.uuid4().hex} {i}" for i in range(10)])
    with pytest.raises(SimulatedCrash):
        flush(settings, crash_after="create")
    job = job_of(fault_deployment, ids[0])
    sdk = OpenAI(base_url=settings.openai_base_url, api_key=settings.api_key(), max_retries=0)

    def ended() -> bool:
        batch = find_provider_batch(sdk, job.id, job.created_at)
        return batch is not None and batch.status == "completed"

    wait_for(ended, 30, "the orphaned provider batch to complete")
    sdk.close()
    assert flush(settings).repaired == 1
    assert job.id in poll(settings).to_ingest
    report = ingest(job.id, settings)
    assert (report.succeeded, report.requeued, report.failed) == (10, 0, 0)
