"""Writing a job's line results into its requests, a chunk per transaction.

Every move is conditional (`batched` rows of this job only) and the ledger ignores duplicates,
so writing a chunk twice (a resumed ingest, a deadlock retried) changes nothing already written.
On PostgreSQL two chunks are written at once on two connections (the database works while
Python parses the next lines); rows are locked in id order, so overlapping chunks (a custom_id
in both files) wait for each other instead of deadlocking."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from threading import Lock
from typing import Any

from psycopg.errors import DeadlockDetected
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from batch.bulk_write import AnswerRow, succeed_in_bulk
from batch.jobs import keep_lock
from batch.leftovers import requeue_or_fail
from batch.results import LineResult
from core.db import among, begin_write, get_engine, is_postgres, session_scope
from core.settings import Settings
from costs.ledger import Usage, record
from lifecycle.moves import move_each
from models.status import Status
from models.tables import BatchJob, Request
from rules.prices import PriceTable
from rules.tokens import count_message_tokens, count_tokens

log = logging.getLogger("sheepdog.batch.ingest")

WRITERS = 2  # chunks written at once on PostgreSQL
DEADLOCK_RETRIES = 3
CHUNK_BYTES = 4 << 20  # answer text per chunk: bounds memory whatever the answers' length


@dataclass(slots=True)
class Tally:
    """What one chunk's transaction moved (or, added up, a whole ingest)."""

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


class Sink:
    """Collects line results and writes them a chunk per transaction; `written` adds up what
    the committed chunks moved."""

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
        self.pending: dict[str, LineResult] = {}
        self.pending_bytes = 0
        self.written = Tally()
        self.postgres = is_postgres(get_engine(settings.database_url))
        self.pool = ThreadPoolExecutor(WRITERS) if self.postgres else None
        self.inflight: list[Future[None]] = []
        self.tally = Lock()
        self.costs: dict[tuple[str, int, int], tuple[Decimal, Decimal]] = {}  # counts repeat

    def add(self, custom_id: str, result: LineResult) -> None:
        if self.pending.setdefault(custom_id, result) is result:
            self.pending_bytes += len(result.text or "") + len(result.reason or "")
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
        if self.lock is not None:  # a long ingest keeps its lock alive
            keep_lock(self.lock, self.job_id)

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

    def _transaction(self, pending: dict[str, LineResult]) -> None:
        for attempt in range(1, DEADLOCK_RETRIES + 1):
            try:
                with session_scope(self.settings.database_url) as session:
                    tally = self._write_chunk(session, pending)
                break
            except OperationalError as err:
                # Two chunks holding one custom_id (a provider repeating a line) lock the
                # same row; PostgreSQL aborts one of them. Every move is conditional, so
                # writing the chunk again is safe.
                if not isinstance(err.orig, DeadlockDetected) or attempt == DEADLOCK_RETRIES:
                    raise
                log.warning("job %s: chunk deadlocked with another; writing it again", self.job_id)
        with self.tally:  # counted once committed
            self.written += tally

    def _write_chunk(self, session: Session, pending: dict[str, LineResult]) -> Tally:
        """One chunk in `session`: answers in bulk where it can, the rest row by row, and the
        job's ingested count and cost."""
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
        return tally

    def _write(self, session: Session, pending: dict[str, LineResult]) -> Tally:
        """Any result, row by row in executemany statements: SQLite's path, and on PostgreSQL
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
        estimates = self._estimates(session, [r[0] for r in rows], pending)
        for request_id, tenant, model, attempts in rows:
            result = pending[request_id]
            if result.kind == "ok":
                p, c = self._usage(request_id, result, estimates)
                estimated = request_id in estimates
                ok.append(self._answer_values(request_id, result, model, p, c, estimated))
                usages.append(
                    Usage(request_id, tenant, model, "batch", p, c, estimated, self.discount)
                )
            elif result.kind == "fail":
                fail.append({"id": request_id, "error": result.reason})
            else:
                retry.append((request_id, attempts, result.reason or "retry"))
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

    def _answer_values(
        self, request_id: str, result: LineResult, model: str, p: int, c: int, estimated: bool
    ) -> dict[str, Any]:
        return {
            "id": request_id,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "prompt_tokens": p,
            "completion_tokens": c,
            "usage_estimated": estimated,
            "cost_usd": self._price(model, p, c)[0],
            "error": None,
        }

    def _succeed_in_bulk(
        self, session: Session, pending: dict[str, LineResult]
    ) -> tuple[dict[str, LineResult], Tally]:
        """PostgreSQL: the chunk's answers through batch/bulk_write.py. Returns the rest of the
        chunk (failures, requeues) and what the answers moved."""
        answers = [rid for rid, result in pending.items() if result.kind == "ok"]
        if not answers:
            return pending, Tally()
        model = self.model or ""
        estimates = self._estimates(session, answers, pending)
        rows: list[AnswerRow] = []
        for rid in answers:
            result = pending[rid]
            p, c = self._usage(rid, result, estimates)
            actual, standard = self._price(model, p, c)
            estimated = rid in estimates
            rows.append((rid, result.text, result.finish_reason, p, c, estimated, actual, standard))
        count, total = succeed_in_bulk(session, self.job_id, model, rows)
        rest = {rid: result for rid, result in pending.items() if result.kind != "ok"}
        return rest, Tally(moved=count, succeeded=count, cost=total)

    def _price(self, model: str, p: int, c: int) -> tuple[Decimal, Decimal]:
        """(cost at this job's batch rate, cost at the standard rate) of a usage, priced once
        per distinct usage: a batch's answers repeat the same few."""
        key = (model, p, c)
        if (priced := self.costs.get(key)) is None:
            priced = self.costs[key] = (
                self.prices.cost_of(model, p, c, "batch", self.discount),
                self.prices.cost_of(model, p, c, "stream"),
            )
        return priced

    @staticmethod
    def _usage(
        request_id: str, result: LineResult, estimates: dict[str, tuple[int, int]]
    ) -> tuple[int, int]:
        """(prompt, completion) tokens of an answer: the provider's, or the local estimate."""
        return estimates.get(request_id) or (
            result.prompt_tokens or 0,
            result.completion_tokens or 0,
        )

    def _estimates(
        self, session: Session, ids: list[str], pending: dict[str, LineResult]
    ) -> dict[str, tuple[int, int]]:
        """Local token estimates for answers that came without usage."""
        ids = [i for i in ids if pending[i].kind == "ok" and pending[i].prompt_tokens is None]
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
