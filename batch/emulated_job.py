"""Emulated batch jobs, the records side: submit a job to its executor
(batch/emulated_executor.py, which makes the calls), keep its state in Redis and its row in the
database, let the poll watch it, and give the ingest its result lines.

For a provider without a Batch API the job's `batched` rows are the input (the database is the
"input file": any worker on any host reads it) and a Redis list is the output "file": each
finished line is appended in the Batch API's own shape, once per custom_id (a `done` hash makes
the append idempotent), so a killed executor resumes with the lines not yet in the hash and the
ingest reads the list exactly like a downloaded output file. The executor holds a heartbeat key
with a TTL; the poll re-sends `sheepdog.batch.emulate` for a running job whose heartbeat lapsed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import select, update

from batch.job_status import move_job_now
from batch.jobs import mark_empty
from batch.jsonl import encode_line
from core import keys
from core.celery_app import EMULATE_TASK, celery_for
from core.db import session_scope
from core.redis_conn import get_redis
from core.settings import Settings
from costs.lane_change import refit
from lifecycle.moves import move_each
from models.status import BatchStatus, Status
from models.tables import BatchJob, Request, utcnow
from rules.prices import load_price_table

log = logging.getLogger("sheepdog.batch.emulated")

EMULATED = "emulated"
TOO_POOR = (
    "invalid request: max_cost_usd or the budget's hold does not cover the prompt at the rate"
    " this provider bills its batch lines (it has no Batch API)"
)
RUNNING = BatchStatus.IN_PROGRESS  # an emulated job's status while its executor works
STATE_TTL_S = 7 * 24 * 3600  # output kept this long if the job is never ingested
READ_CHUNK_LINES = 1000
PAGE = 1000  # rows the executor reads from the database at a time
EXHAUSTED = "emulated_retries_exhausted"  # error code of a line whose retries ran out

# KEYS: done, lines, counts; ARGV: custom_id, line, counter, ttl ms. 1 when appended.
APPEND = """
if redis.call('HSETNX', KEYS[1], ARGV[1], 1) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return 1
"""
# KEYS: heartbeat; ARGV: token, ttl ms. 1 while the caller owns the job.
REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def state_keys(names: keys.Keys, job_id: str) -> tuple[str, str, str]:
    """(done, lines, counts) keys of a job, in the order APPEND takes them."""
    return (
        names.emulated(job_id, "done"),
        names.emulated(job_id, "lines"),
        names.emulated(job_id, "counts"),
    )


@dataclass
class Submitted:
    lines: int
    bytes: int
    failed: int


def submit_emulated(
    settings: Settings, job_id: str, model: str, discount: Decimal | None = None
) -> Submitted:
    """Check the job's rows as batch lines (failing those that cannot be one, as the file
    writer does), mark the job running and send its executor. Caller holds the job lock.

    The lines are billed at the provider's `discount` (rules.prices.provider_batch_discount):
    a row capped and held at the table's batch rate (its `auto` provider not yet probed when
    it was submitted) has its max_tokens cut to that rate first; one whose cap or hold does
    not cover its prompt there fails, saying so."""
    lines = size = 0
    rejected: list[dict[str, Any]] = []
    with session_scope(settings.database_url) as session:
        mine = (Request.batch_job_id == job_id) & (Request.status == Status.BATCHED.value)
        ids = list(session.scalars(select(Request.id).where(mine)))
        table = load_price_table(settings.price_table_file)  # the one ingest bills from
        rates = table.at_batch_discounts({model: discount} if discount is not None else {})
        kept: set[str] = set()
        step = settings.batch_ingest_chunk  # (bodies in memory, ids in one IN list)
        for start in range(0, len(ids), step):
            fit = refit(session, ids[start : start + step], "batch", rates)
            fit.write(session, mine)
            kept |= fit.kept
        rejected = [{"id": rid, "error": TOO_POOR} for rid in kept]
        stmt = select(Request.id, Request.body).where(mine).execution_options(yield_per=2000)
        for request_id, body in session.execute(stmt):
            if request_id in kept:
                continue
            try:
                data = encode_line(request_id, body, model)
            except ValueError as err:
                rejected.append({"id": request_id, "error": str(err)})
                continue
            lines += 1
            size += len(data)
    if rejected:
        with session_scope(settings.database_url) as session:
            move_each(session, rejected, Status.FAILED, from_=[Status.BATCHED])
        log.warning("job %s: %d request(s) could not be a batch line", job_id, len(rejected))
    now = utcnow()
    if lines == 0:
        mark_empty(settings, job_id)
        return Submitted(0, 0, len(rejected))
    move_job_now(
        settings,
        job_id,
        RUNNING,
        from_=[BatchStatus.PREPARING],
        request_count=lines,
        input_bytes=size,
        submitted_at=now,
    )
    send(settings, job_id)
    log.info("job %s: %d lines of %s handed to the emulated executor", job_id, lines, model)
    return Submitted(lines, size, len(rejected))


def send(settings: Settings, job_id: str) -> None:
    """Send the job's executor task (a no-op at the worker if a live executor holds it)."""
    celery_for(settings).send_task(EMULATE_TASK, args=[job_id])


def heartbeat_alive(settings: Settings, job_id: str) -> bool:
    return bool(
        get_redis(settings.redis_url).exists(keys.of(settings).emulated(job_id, "heartbeat"))
    )


def watch(settings: Settings, max_wait: timedelta, now: datetime) -> tuple[int, list[str]]:
    """The poll's part: re-send running jobs whose executor is gone, stop jobs open too long.
    Returns (jobs re-sent, jobs cancelled)."""
    with session_scope(settings.database_url) as session:
        jobs = session.execute(
            select(BatchJob.id, BatchJob.status, BatchJob.submitted_at).where(
                BatchJob.mode == EMULATED,
                BatchJob.status.in_([RUNNING.value, BatchStatus.CANCELLING.value]),
            )
        ).all()
    r = get_redis(settings.redis_url)
    resent: int = 0
    cancelled: list[str] = []
    for job_id, status, submitted_at in jobs:
        alive = heartbeat_alive(settings, job_id)
        overdue = submitted_at is not None and now - submitted_at > max_wait
        if overdue or (status == BatchStatus.CANCELLING and not alive):
            # A live executor sees `cancelling` and ends the job; a dead one cannot.
            to = BatchStatus.CANCELLING if alive else BatchStatus.CANCELLED
            move_job_now(settings, job_id, to, from_=[BatchStatus(status)])
            if status == RUNNING:
                log.warning(
                    "job %s: emulated job open longer than %s, cancelling", job_id, max_wait
                )
                cancelled.append(job_id)
            continue
        if alive or status != RUNNING:
            continue
        # One resend per heartbeat TTL: a message waiting in the queue is not duplicated.
        ttl_ms = int(settings.emulated_heartbeat_ttl_s * 1000)
        if r.set(keys.of(settings).emulated(job_id, "kick"), b"1", nx=True, px=ttl_ms):
            log.warning("job %s: emulated executor not alive; sending it again", job_id)
            send(settings, job_id)
            resent += 1
    return resent, cancelled


def result_lines(settings: Settings, job_id: str) -> Iterator[bytes]:
    """The job's output lines (the ingest's line source), read a chunk at a time."""
    r = get_redis(settings.redis_url)
    key = keys.of(settings).emulated(job_id, "lines")
    start = 0
    while True:
        chunk = r.lrange(key, start, start + READ_CHUNK_LINES - 1)
        if not chunk:
            return
        for line in chunk:
            yield line if isinstance(line, bytes) else line.encode()
        start += len(chunk)


def forget(settings: Settings, job_id: str) -> None:
    """Drop an ingested job's Redis state."""
    names = keys.of(settings)
    get_redis(settings.redis_url).delete(*state_keys(names, job_id), names.emulated(job_id, "kick"))


def output_line(custom_id: str, status_code: int, request_id: str | None, body: Any) -> bytes:
    """A line as the Batch API writes it for a response (200 to the output file, others to
    the error file)."""
    return orjson.dumps(
        {
            "id": _line_id(),
            "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body},
            "error": None,
        }
    )


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """A line for a request that got no response (the Batch API's `error` object)."""
    return orjson.dumps(
        {
            "id": _line_id(),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )


def _line_id() -> str:
    import secrets

    return "batch_req_" + secrets.token_hex(12)


# -- the executor's reads and writes of the job's rows ---------------------------------------


def pending_rows(settings: Settings, job_id: str, after_id: str) -> list[tuple[str, Any]]:
    """The next rows of the job still waiting for a result (keyset by id)."""
    with session_scope(settings.database_url) as session:
        rows: Iterable[Any] = session.execute(
            select(Request.id, Request.body)
            .where(
                Request.batch_job_id == job_id,
                Request.status == Status.BATCHED.value,
                Request.id > after_id,
            )
            .order_by(Request.id)
            .limit(PAGE)
        ).all()
        return [(rid, body) for rid, body in rows]


def write_counts(settings: Settings, job_id: str, counts: dict[str, int]) -> str:
    """Write request_counts while the job runs; returns the job's status."""
    with session_scope(settings.database_url) as session:
        session.execute(
            update(BatchJob)
            .where(BatchJob.id == job_id, BatchJob.status == RUNNING.value)
            .values(
                completed_count=counts.get("completed", 0),
                failed_count=counts.get("failed", 0),
                updated_at=utcnow(),
            )
        )
        return str(session.scalar(select(BatchJob.status).where(BatchJob.id == job_id)))


def end_job(
    settings: Settings, job_id: str, frm: BatchStatus, to: BatchStatus, counts: dict[str, int]
) -> None:
    """End a run: `frm` -> `to` with the final request counts (when given)."""
    values = {
        "completed_count": counts.get("completed", 0),
        "failed_count": counts.get("failed", 0),
    }
    move_job_now(settings, job_id, to, from_=[frm], **(values if counts else {}))
