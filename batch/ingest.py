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
from psycopg.errors import DeadlockDetected
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
    func,
    select,
    update,
)
from sqlalchemy.exc import OperationalError

from batch import emulated
from batch.claim import begin_write
from batch.emulated import EMULATED
from batch.jobs import FINAL, discount_for, job_lock, provider_of, release
from batch.jsonl import READ_CHUNK, file_lines, job_path, split_lines
from core.db import among, get_engine, is_postgres, session_scope
from core.providers import ProviderConfig, client_for
from core.settings import Settings, get_settings
from costs.ledger import Usage, record, record_moved, with_discount
from lifecycle.moves import move_each, move_from_statement
from models.batch_lines import BatchErrorItem, CompletionBody, ErrorObject, OutputLine
from models.status import Status
from models.tables import BatchJob, Request, utcnow
from rules.prices import PriceTable, load_price_table
from rules.tokens import count_message_tokens, count_tokens
from webhooks.outbox import batch_ended, request_ended

log = logging.getLogger("sheepdog.batch.ingest")

RESULT_COLUMNS = (
    "id",
    "text",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "usage_estimated",
    "cost_usd",
    "standard_cost_usd",
    "job_id",
)
RESULTS_TABLE = """
CREATE TEMP TABLE batch_results (
    id varchar(40) PRIMARY KEY, text text, finish_reason varchar(32), prompt_tokens integer,
    completion_tokens integer, usage_estimated boolean, cost_usd numeric(20, 10),
    standard_cost_usd numeric(20, 10), job_id varchar(40)
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
    Column("standard_cost_usd", Numeric(20, 10)),
    Column("job_id", String(40)),
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
DEADLOCK_RETRIES = 3
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


@dataclass(slots=True)
class Tally:
    """What one chunk's transaction moved."""

    moved: int = 0
    succeeded: int = 0
    failed: int = 0
    requeued: int = 0
    cost: Decimal = Decimal(0)  # of the answers it wrote

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.moved + other.moved,
            self.succeeded + other.succeeded,
            self.failed + other.failed,
            self.requeued + other.requeued,
            self.cost + other.cost,
        )


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
    return _plain_answer(raw) or _parse_validated(raw)


def _plain_answer(raw: bytes) -> tuple[str, Outcome] | None:
    """The common line (one choice with text, usage or none) read with orjson and exact type
    checks, at a fraction of the models' cost. It accepts only lines the models accept and gives
    the same outcome; anything else (errors, odd shapes, malformed lines) returns None and goes
    through `_parse_validated`, the reference."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(line) is not dict or line.get("error") is not None:
        return None
    custom_id, response, line_id = line.get("custom_id"), line.get("response"), line.get("id")
    if type(custom_id) is not str or not custom_id or type(response) is not dict:
        return None
    if not (line_id is None or type(line_id) is str) or response.get("status_code") != 200:
        return None
    request_id, body = response.get("request_id"), response.get("body")
    if type(response["status_code"]) is not int or type(body) is not dict:
        return None
    if not (request_id is None or type(request_id) is str):
        return None
    choices, usage = body.get("choices"), body.get("usage")
    if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
        return None
    message, finish = choices[0].get("message"), choices[0].get("finish_reason")
    if type(message) is not dict or not (finish is None or type(finish) is str):
        return None
    text, refusal = message.get("content"), message.get("refusal")
    if type(text) is not str or not (refusal is None or type(refusal) is str):
        return None
    if usage is None:
        return custom_id, Outcome("ok", text=text, finish_reason=finish)
    if type(usage) is not dict:
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    return custom_id, Outcome("ok", text, finish, prompt, completion)


def _parse_validated(raw: bytes) -> tuple[str, Outcome] | None:
    """`parse_line` through the pydantic models: every shape, errors included."""
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
        model: str | None = None,
    ) -> None:
        self.settings = settings
        self.job_id = job_id
        self.prices = prices
        self.discount = discount  # the provider's batch discount when not the price table's
        self.model = model  # the job's model: one per job, so one price for all its answers
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
        if getattr(self.lock, "lost", False):
            raise LostLock(f"job {self.job_id}: lock taken over by another ingest")
        try:
            self.lock.reacquire()
        except redis.exceptions.LockError:
            if not self.lock.acquire():
                raise LostLock(f"job {self.job_id}: lock taken over by another ingest") from None

    def _transaction(self, pending: dict[str, Outcome]) -> None:
        for attempt in range(1, DEADLOCK_RETRIES + 1):
            try:
                with session_scope(self.settings.database_url) as session:
                    begin_write(session)
                    rest, bulk = pending, Tally()
                    if self.postgres and self.model is not None:
                        rest, bulk = self._succeed_in_bulk(session, pending)
                    tally = bulk + self._write(session, rest)
                    if tally.moved:
                        session.execute(
                            update(BatchJob)
                            .where(BatchJob.id == self.job_id)
                            .values(
                                ingested_count=BatchJob.ingested_count + tally.moved,
                                cost_usd=func.coalesce(BatchJob.cost_usd, 0) + tally.cost,
                            )
                        )
                break
            except OperationalError as err:
                # Two chunks holding one custom_id (a provider repeating a line) lock the
                # same row; PostgreSQL aborts one of them. Every move is conditional, so
                # writing the chunk again is safe.
                if not isinstance(err.orig, DeadlockDetected) or attempt == DEADLOCK_RETRIES:
                    raise
                log.warning("job %s: chunk deadlocked with another; writing it again", self.job_id)
        with self.tally:  # counted once committed
            self.report.succeeded += tally.succeeded
            self.report.failed += tally.failed
            self.report.requeued += tally.requeued

    def _write(self, session: Any, pending: dict[str, Outcome]) -> Tally:
        """Any outcome, row by row in executemany statements: SQLite's path, and on PostgreSQL
        the failures and requeues left after the bulk answers. Rows are locked in id order."""
        if not pending:
            return Tally()
        stmt = (
            select(Request.id, Request.tenant, Request.model, Request.attempts)
            .where(Request.batch_job_id == self.job_id, Request.status == Status.BATCHED.value)
            .where(among(session, Request.id, sorted(pending)))
        )
        if self.postgres:
            stmt = stmt.order_by(Request.id).with_for_update()
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
                p, c = estimates.get(request_id) or (
                    out.prompt_tokens or 0,
                    out.completion_tokens or 0,
                )
                price = rates.get(model) or rates.setdefault(
                    model, with_discount(self.prices.get(model), self.discount)
                )
                ok.append(
                    {
                        "id": request_id,
                        "text": out.text,
                        "finish_reason": out.finish_reason,
                        "prompt_tokens": p,
                        "completion_tokens": c,
                        "usage_estimated": estimated,
                        "cost_usd": price.cost(p, c, "batch"),
                        "error": None,
                    }
                )
                usages.append(
                    Usage(request_id, tenant, model, "batch", p, c, estimated, self.discount)
                )
            elif out.kind == "fail":
                fail.append({"id": request_id, "error": out.reason})
            else:
                retry.append((request_id, attempts, out.reason or "retry"))
        succeeded = move_each(session, ok, Status.SUCCEEDED, from_=[Status.BATCHED])
        record(session, usages, self.prices)
        failed = move_each(session, fail, Status.FAILED, from_=[Status.BATCHED])
        requeued, gave_up = requeue_or_fail(session, self.settings, retry)
        return Tally(
            moved=succeeded + failed + requeued + gave_up,
            succeeded=len(ok),
            failed=len(fail) + gave_up,
            requeued=requeued,
            cost=sum((row["cost_usd"] for row in ok), Decimal(0)),  # all move: rows locked
        )

    def _succeed_in_bulk(
        self, session: Any, pending: dict[str, Outcome]
    ) -> tuple[dict[str, Outcome], Tally]:
        """PostgreSQL: COPY the chunk's answers into a temporary table, then one statement moves
        this job's `batched` rows among them to succeeded (the lifecycle's UPDATE ... FROM),
        ledgers them and settles their budgets (costs.ledger.record_moved). Set-based
        statements cost a fraction of thousands of single-row ones. Returns the rest of the
        chunk (failures, requeues)."""
        answers = [rid for rid, out in pending.items() if out.kind == "ok"]
        if not answers:
            return pending, Tally()
        estimates = self._estimates(session, answers, pending)
        price = with_discount(self.prices.get(self.model or ""), self.discount)
        costs: dict[tuple[int, int], tuple[Decimal, Decimal]] = {}  # counts repeat
        raw = session.connection().connection.driver_connection
        with raw.cursor() as cur:
            # Probe `requests` by primary key for each of the chunk's rows: the planner's
            # default costs (random_page_cost 4) prefer hashing every batched row of the
            # table, or scanning it whole, once per chunk.
            cur.execute("SET LOCAL enable_hashjoin = off")
            cur.execute("SET LOCAL enable_mergejoin = off")
            cur.execute(RESULTS_TABLE)
            with cur.copy(f"COPY batch_results ({', '.join(RESULT_COLUMNS)}) FROM STDIN") as copy:
                for rid in answers:
                    out = pending[rid]
                    estimate = estimates.get(rid)
                    p, c = estimate or (out.prompt_tokens or 0, out.completion_tokens or 0)
                    if (cost := costs.get((p, c))) is None:
                        cost = costs[p, c] = (price.cost(p, c, "batch"), price.cost(p, c, "stream"))
                    row = (
                        rid,
                        out.text,
                        out.finish_reason,
                        p,
                        c,
                        bool(estimate),
                        *cost,
                        self.job_id,
                    )
                    copy.write_row(row)
        moved = move_from_statement(
            RESULTS,
            Status.SUCCEEDED,
            columns=RESULT_COLUMNS[1:7],
            from_=[Status.BATCHED],
            where=Request.batch_job_id == RESULTS.c.job_id,
            error=None,
        )
        count, total = record_moved(
            session,
            moved.returning(Request.id, Request.tenant).cte("moved"),
            RESULTS,
            model=self.model or "",
            route="batch",
        )
        if count:
            request_ended(session, answers, Status.SUCCEEDED.value)  # same transaction
        rest = {rid: out for rid, out in pending.items() if out.kind != "ok"}
        return rest, Tally(moved=count, succeeded=count, cost=total)

    def _estimates(
        self, session: Any, ids: list[str], pending: dict[str, Outcome]
    ) -> dict[str, tuple[int, int]]:
        """Local token estimates for answers that came without usage."""
        ids = [i for i in ids if pending[i].prompt_tokens is None]
        if not ids:
            return {}
        bodies = session.execute(
            select(Request.id, Request.body).where(among(session, Request.id, ids))
        )
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
    sink = Sink(settings, job_id, prices, lock, discount, model)
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
    """Mark the job ingested; its cost was added up chunk by chunk, in the transactions that
    wrote the answers (so it counts each answer once, whatever was resumed)."""
    with session_scope(settings.database_url) as session:
        marked = session.execute(
            update(BatchJob)
            .where(BatchJob.id == job_id, BatchJob.ingested_at.is_(None))
            .values(
                cost_usd=func.coalesce(BatchJob.cost_usd, 0),
                malformed_lines=malformed,
                ingested_at=utcnow(),
            )
            .returning(BatchJob.status)
        ).scalar()
        if marked is not None:  # the job's end, once: its tenants' batch webhooks
            batch_ended(session, job_id, marked)
        cost = session.scalar(select(BatchJob.cost_usd).where(BatchJob.id == job_id))
    return Decimal(str(cost or 0))
