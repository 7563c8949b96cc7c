"""Ingest a finished batch job: stream its output and error files line by line, join each line
to its request by custom_id, and write results in bulk.

Re-runnable by design: every move is conditional (`batched` rows of this job only) and the
ledger ignores duplicates, so ingesting the same file twice, or resuming after a killed worker,
changes nothing already written. Requests that got no usable line go back to `queued` (up to
batch_max_attempts) or end `failed`; the job's cost is summed once, when it is marked ingested.
An emulated job (provider without a Batch API) has no files: its lines, in the same shapes, come
from the Redis list its executor wrote (scheduler/emulated.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from threading import Lock
from typing import Any

import openai
import orjson
import redis
from pydantic import ValidationError
from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    any_,
    cast,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from costs.ledger import Usage, record, with_discount
from costs.prices import PriceTable, load_price_table
from models.batch_lines import BatchErrorItem, CompletionBody, ErrorObject, OutputLine
from models.tables import BatchJob, Request, utcnow
from scheduler import emulated
from scheduler.claim import begin_write
from scheduler.emulated import EMULATED
from scheduler.jobs import FINAL, discount_for, job_lock, provider_of, release
from scheduler.jsonl import READ_CHUNK, file_lines, job_path, split_lines
from sheepdog.db import get_engine, is_postgres, session_scope
from sheepdog.lifecycle import Status, move_each, move_from
from sheepdog.providers import ProviderConfig, client_for
from sheepdog.settings import Settings, get_settings
from sheepdog.tokens import count_message_tokens, count_tokens

log = logging.getLogger("sheepdog.batch.ingest")

RESULT_COLUMNS = (
    "id",
    "text",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "usage_estimated",
    "cost_usd",
)
RESULTS_TABLE = """
CREATE TEMP TABLE batch_results (
    id varchar(40) PRIMARY KEY, text text, finish_reason varchar(32), prompt_tokens integer,
    completion_tokens integer, usage_estimated boolean, cost_usd numeric(20, 10)
) ON COMMIT DROP"""
RESULTS = Table(
    "batch_results",
    MetaData(),
    Column("id", String(40), primary_key=True),
    Column("text", Text),
    Column("finish_reason", String(32)),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("usage_estimated", Boolean),
    Column("cost_usd", Numeric(20, 10)),
)

# A line the emulated executor gave up on (provider down or throttling) is retried like an
# expired one, in a later batch.
REQUEUE_CODES = frozenset({"batch_expired", "batch_cancelled", "emulated_retries_exhausted"})
LEFTOVER_REASON = {
    "completed": "the batch returned no result line for this request",
    "expired": "the batch expired before this request ran",
    "cancelled": "the batch was cancelled before this request ran",
    "failed": "the batch failed",
}
MALFORMED_LOGGED = 5
WRITERS = 2  # chunks written at once on PostgreSQL
CHUNK_BYTES = 4 << 20  # answer text per chunk: bounds memory whatever the answers' length


@dataclass(slots=True)
class Outcome:
    """What one result line says about its request."""

    kind: str  # "ok" | "fail" | "requeue"
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reason: str | None = None


@dataclass
class IngestReport:
    job_id: str
    status: str = ""
    succeeded: int = 0
    failed: int = 0
    requeued: int = 0
    malformed: int = 0
    skipped: str | None = None  # why nothing was done (already ingested, busy, not final)
    cost_usd: Decimal = Decimal(0)


def parse_line(raw: bytes) -> tuple[str, Outcome] | None:
    """(custom_id, outcome) of one output/error line, or None when the line is malformed.

    A line counts as an answer only when it is a 200 response whose body has a choice with
    text; anything else is a failure with the provider's reason, or malformed."""
    try:
        line = OutputLine.model_validate_json(raw)
    except ValidationError:
        return None
    response, error = line.response, line.error
    if response is not None and response.status_code == 200 and error is None:
        try:
            body = CompletionBody.model_validate(response.body or {})
        except ValidationError:
            return None
        choice = body.choices[0]
        if choice.message.content is None:
            if choice.message.refusal:
                return line.custom_id, Outcome("fail", reason=f"refusal: {choice.message.refusal}")
            return None
        usage = body.usage
        return line.custom_id, Outcome(
            "ok",
            text=choice.message.content,
            finish_reason=choice.finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )
    if error is None and response is not None:
        raw_error = (response.body or {}).get("error")
        try:
            error = ErrorObject.model_validate(raw_error if isinstance(raw_error, dict) else {})
        except ValidationError:
            error = ErrorObject()
        reason = error.reason(response.status_code)
    elif error is not None:
        reason = error.reason()
    else:
        return None
    kind = "requeue" if error.code in REQUEUE_CODES else "fail"
    return line.custom_id, Outcome(kind, reason=reason)


class LostLock(RuntimeError):
    """The job lock expired and another process took the job over."""


class Sink:
    """Collects outcomes and writes them a chunk per transaction.

    On PostgreSQL two chunks are written at once on two connections (the database works while
    Python parses the next lines); rows are locked in id order, so overlapping chunks (a
    custom_id in both files) wait for each other instead of deadlocking."""

    def __init__(
        self,
        settings: Settings,
        job_id: str,
        prices: PriceTable,
        lock: Any,
        discount: Decimal | None = None,
    ) -> None:
        self.settings = settings
        self.job_id = job_id
        self.prices = prices
        self.discount = discount  # the provider's batch discount when not the price table's
        self.lock = lock
        self.pending: dict[str, Outcome] = {}
        self.pending_bytes = 0
        self.report = IngestReport(job_id)
        self.postgres = is_postgres(get_engine(settings.database_url))
        self.pool = ThreadPoolExecutor(WRITERS) if self.postgres else None
        self.inflight: list[Future[None]] = []
        self.tally = Lock()

    def add(self, custom_id: str, outcome: Outcome) -> None:
        if self.pending.setdefault(custom_id, outcome) is outcome:
            self.pending_bytes += len(outcome.text or "") + len(outcome.reason or "")
        if (
            len(self.pending) >= self.settings.batch_ingest_chunk
            or self.pending_bytes >= CHUNK_BYTES
        ):
            self._submit()

    def _submit(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        self.pending_bytes = 0
        if self.pool is None:
            self._transaction(pending)
        else:
            if len(self.inflight) >= WRITERS:
                self.inflight.pop(0).result()
            self.inflight.append(self.pool.submit(self._transaction, pending))
        self._keep_lock()

    def flush(self) -> None:
        """Write what is pending and wait for every chunk in flight."""
        self._submit()
        try:
            for future in self.inflight:
                future.result()
        finally:
            self.inflight.clear()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _keep_lock(self) -> None:
        # A long ingest keeps its lock alive; if it expired, take it again unless someone
        # else has, in which case stop (they carry on from the same files).
        if self.lock is None:
            return
        try:
            self.lock.reacquire()
        except redis.exceptions.LockError:
            if not self.lock.acquire():
                raise LostLock(f"job {self.job_id}: lock taken over by another ingest") from None

    def _transaction(self, pending: dict[str, Outcome]) -> None:
        with session_scope(self.settings.database_url) as session:
            begin_write(session)
            self._write(session, pending)

    def _write(self, session: Any, pending: dict[str, Outcome]) -> None:
        ids = sorted(pending)
        stmt = select(Request.id, Request.tenant, Request.model, Request.attempts).where(
            Request.batch_job_id == self.job_id, Request.status == Status.BATCHED.value
        )
        if self.postgres:
            # One array parameter instead of thousands of placeholders (cheap to send and
            # to convert), rows locked in id order.
            stmt = (
                stmt.where(Request.id == any_(cast(literal(ids), ARRAY(String))))
                .order_by(Request.id)
                .with_for_update()
            )
        else:
            stmt = stmt.where(Request.id.in_(ids))
        rows = session.execute(stmt).all()
        ok: list[dict[str, Any]] = []
        usages: list[Usage] = []
        fail: list[dict[str, Any]] = []
        retry: list[tuple[str, int, str]] = []
        missing_usage = [r[0] for r in rows if pending[r[0]].kind == "ok"]
        estimates = self._estimates(session, missing_usage, pending)
        rates: dict[str, Any] = {}
        for request_id, tenant, model, attempts in rows:
            out = pending[request_id]
            if out.kind == "ok":
                estimated = request_id in estimates
                p, c = estimates.get(request_id, (out.prompt_tokens, out.completion_tokens))
                price = rates.get(model) or rates.setdefault(
                    model, with_discount(self.prices.get(model), self.discount)
                )
                cost = price.cost(p or 0, c or 0, "batch")
                ok.append(
                    {
                        "id": request_id,
                        "text": out.text,
                        "finish_reason": out.finish_reason,
                        "prompt_tokens": p,
                        "completion_tokens": c,
                        "usage_estimated": estimated,
                        "cost_usd": cost,
                        "error": None,
                    }
                )
                usages.append(
                    Usage(
                        request_id,
                        tenant,
                        model,
                        "batch",
                        p or 0,
                        c or 0,
                        estimated,
                        batch_discount=self.discount,
                    )
                )
            elif out.kind == "fail":
                fail.append({"id": request_id, "error": out.reason})
            else:
                retry.append((request_id, attempts, out.reason or "retry"))
        if self.postgres and ok:
            moved = self._succeed_in_bulk(session, ok)
        else:
            moved = move_each(session, ok, Status.SUCCEEDED, from_=[Status.BATCHED])
        record(session, usages, self.prices)
        moved += move_each(session, fail, Status.FAILED, from_=[Status.BATCHED])
        requeued, failed = requeue_or_fail(session, self.settings, retry)
        moved += requeued + failed
        session.execute(
            update(BatchJob)
            .where(BatchJob.id == self.job_id)
            .values(ingested_count=BatchJob.ingested_count + moved)
        )
        with self.tally:
            self.report.succeeded += len(ok)
            self.report.failed += len(fail) + failed
            self.report.requeued += requeued

    def _succeed_in_bulk(self, session: Any, ok: list[dict[str, Any]]) -> int:
        """PostgreSQL: COPY the answers into a temporary table, then let the lifecycle move the
        rows to succeeded with their answers in one UPDATE ... FROM (rows locked FOR UPDATE
        above). One set-based UPDATE costs a fraction of thousands of single-row ones, and one
        instead of two means one new row version per request."""
        raw = session.connection().connection.driver_connection
        with raw.cursor() as cur:
            cur.execute(RESULTS_TABLE)
            with cur.copy(f"COPY batch_results ({', '.join(RESULT_COLUMNS)}) FROM STDIN") as copy:
                for row in ok:
                    copy.write_row([row[c] for c in RESULT_COLUMNS])
        return move_from(
            session,
            RESULTS,
            Status.SUCCEEDED,
            columns=RESULT_COLUMNS[1:],
            from_=[Status.BATCHED],
            where=Request.batch_job_id == self.job_id,
            error=None,
        )

    def _estimates(
        self, session: Any, ids: list[str], pending: dict[str, Outcome]
    ) -> dict[str, tuple[int, int]]:
        """Local token estimates for answers that came without usage."""
        ids = [i for i in ids if pending[i].prompt_tokens is None]
        if not ids:
            return {}
        bodies = session.execute(select(Request.id, Request.body).where(Request.id.in_(ids)))
        return {
            rid: (
                count_message_tokens(body.get("messages") or []),
                count_tokens(pending[rid].text or ""),
            )
            for rid, body in bodies
        }


def requeue_or_fail(
    session: Any, settings: Settings, rows: Iterable[tuple[str, int, str]]
) -> tuple[int, int]:
    """Send (id, attempts, reason) rows back to `queued` for the next batch, or fail those
    that have used their batch_max_attempts. Returns (requeued, failed)."""
    again: list[dict[str, Any]] = []
    final: list[dict[str, Any]] = []
    for request_id, attempts, reason in rows:
        if attempts < settings.batch_max_attempts:
            again.append({"id": request_id, "batch_job_id": None, "error": f"retrying: {reason}"})
        else:
            final.append(
                {"id": request_id, "error": f"{reason} (gave up after {attempts} batch attempts)"}
            )
    requeued = move_each(session, again, Status.QUEUED, from_=[Status.BATCHED])
    failed = move_each(session, final, Status.FAILED, from_=[Status.BATCHED])
    return requeued, failed


def download_lines(client: openai.OpenAI, file_id: str) -> Iterator[bytes]:
    """Lines of a provider file, streamed (never the whole file in memory)."""
    with client.files.with_streaming_response.content(file_id) as response:
        yield from split_lines(response.iter_bytes(READ_CHUNK))


def ingest(
    job_id: str,
    settings: Settings | None = None,
    *,
    prices: PriceTable | None = None,
    lines: Iterable[bytes] | None = None,
) -> IngestReport:
    """Write a final job's results into its requests (idempotent; see the module docstring).

    `lines` (tests, tools): result lines to use instead of downloading the job's files."""
    settings = settings or get_settings()
    prices = prices or load_price_table(settings.price_table_file)
    with session_scope(settings.database_url) as session:
        job = session.get(BatchJob, job_id)
        if job is None:
            return IngestReport(job_id, skipped="no such job")
        status, errors = job.status, job.errors
        files = [job.output_file_id, job.error_file_id]
        input_file_id = job.input_file_id
        mode, provider_name, model = job.mode, job.provider, job.model
        if job.ingested_at is not None:
            return IngestReport(job_id, status, skipped="already ingested")
    if status not in FINAL:
        return IngestReport(job_id, status, skipped=f"not final ({status})")
    try:
        provider: ProviderConfig | None = provider_of(settings, provider_name, model)
    except KeyError:
        provider = None  # no longer configured: price table rates, files unreachable
    discount = discount_for(provider, mode) if provider is not None else None
    lock = job_lock(settings, job_id)
    if not lock.acquire():
        return IngestReport(job_id, status, skipped="another ingest holds the job")
    sink = Sink(settings, job_id, prices, lock, discount)
    try:
        malformed = 0
        if lines is None and mode == EMULATED:
            lines = emulated.result_lines(settings, job_id)
        elif lines is None:
            if provider is None:
                raise KeyError(f"job {job_id}: provider {provider_name!r} is not configured")
            client = client_for(provider)
            if status == "failed":
                lines = _validation_failures(settings, client, job_id, input_file_id, errors)
            else:
                lines = _result_lines(client, files)
        for raw in lines:
            parsed = parse_line(raw)
            if parsed is None:
                malformed += 1
                if malformed <= MALFORMED_LOGGED:
                    log.warning("job %s: malformed result line: %.200r", job_id, raw)
                continue
            sink.add(*parsed)
        sink.flush()
        report = sink.report
        report.status, report.malformed = status, malformed
        _leftovers(settings, job_id, _leftover_reason(status, errors), report)
        report.cost_usd = _finish(settings, job_id, malformed)
        if mode == EMULATED:
            emulated.forget(settings, job_id)
    except LostLock as err:
        log.warning("%s; stopping this ingest", err)
        return IngestReport(job_id, status, skipped=str(err))
    finally:
        sink.close()
        release(lock)
    log.info(
        "job %s ingested: %d succeeded, %d failed, %d requeued, %d malformed lines, $%s",
        job_id,
        report.succeeded,
        report.failed,
        report.requeued,
        report.malformed,
        report.cost_usd,
    )
    return report


def _result_lines(client: openai.OpenAI, file_ids: list[str | None]) -> Iterator[bytes]:
    for file_id in file_ids:
        if not file_id:
            continue
        try:
            yield from download_lines(client, file_id)
        except openai.NotFoundError:
            log.warning("result file %s is gone; its requests are retried", file_id)


def _validation_failures(
    settings: Settings,
    client: openai.OpenAI,
    job_id: str,
    input_file_id: str | None,
    errors: dict[str, Any] | None,
) -> Iterator[bytes]:
    """Error lines (provider format) for the input lines a failed validation names; the rest
    of the job's requests are left for the leftover pass (queued again)."""
    items = []
    for entry in (errors or {}).get("data") or []:
        try:
            items.append(BatchErrorItem.model_validate(entry))
        except ValidationError:
            continue
    by_line = {e.line: e for e in items if e.line is not None}
    if not by_line:
        return
    local = job_path(settings.batch_workdir, job_id)
    if local.exists():
        source: Iterable[bytes] = file_lines(local)
    elif input_file_id:
        source = download_lines(client, input_file_id)
    else:
        return
    last = max(by_line)
    for number, raw in enumerate(source, start=1):
        if number > last:
            break
        item = by_line.get(number)
        if item is None:
            continue
        try:
            custom_id = orjson.loads(raw).get("custom_id")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(custom_id, str) and custom_id:
            message = f"batch validation: {item.message or 'invalid line'}"
            yield orjson.dumps(
                {"custom_id": custom_id, "error": {"code": item.code, "message": message}}
            )


def _leftover_reason(status: str, errors: dict[str, Any] | None) -> str:
    reason = LEFTOVER_REASON.get(status, f"the batch ended {status}")
    data = (errors or {}).get("data") or []
    if status == "failed" and data and isinstance(data[0], dict):
        reason += f": {data[0].get('code')}: {data[0].get('message')}"
    return reason


def _leftovers(settings: Settings, job_id: str, reason: str, report: IngestReport) -> None:
    """Requests of the job still `batched` after both files got no usable line."""
    while True:
        with session_scope(settings.database_url) as session:
            begin_write(session)
            rows = session.execute(
                select(Request.id, Request.attempts)
                .where(Request.batch_job_id == job_id, Request.status == Status.BATCHED.value)
                .limit(settings.batch_ingest_chunk)
            ).all()
            if not rows:
                return
            requeued, failed = requeue_or_fail(
                session, settings, [(rid, attempts, reason) for rid, attempts in rows]
            )
        report.requeued += requeued
        report.failed += failed
        if requeued + failed == 0:
            return  # nothing movable (cannot happen under the job lock); do not spin


def _finish(settings: Settings, job_id: str, malformed: int) -> Decimal:
    """Sum the job's cost once and mark it ingested."""
    with session_scope(settings.database_url) as session:
        cost = session.scalar(
            select(func.coalesce(func.sum(Request.cost_usd), 0)).where(
                Request.batch_job_id == job_id, Request.status == Status.SUCCEEDED.value
            )
        )
        total = Decimal(str(cost or 0))
        session.execute(
            update(BatchJob)
            .where(BatchJob.id == job_id, BatchJob.ingested_at.is_(None))
            .values(cost_usd=total, malformed_lines=malformed, ingested_at=utcnow())
        )
    return total
