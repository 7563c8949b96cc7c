"""PostgreSQL's bulk path for a chunk of answers: COPY them into a temporary table, then one
UPDATE ... FROM moves this job's `batched` rows among them to `succeeded` (the lifecycle's
move), one statement ledgers them and settles their budgets (costs.ledger.record_moved), and
their webhooks go into the outbox, all in the caller's transaction. Set-based statements cost a
fraction of thousands of single-row ones."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from sqlalchemy import Boolean, Column, Integer, MetaData, Numeric, String, Table, Text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateTable

from costs.ledger import record_moved
from lifecycle.moves import move_from_statement
from models.status import Status
from models.tables import Request
from webhooks.outbox import request_ended

# The chunk's answers, one row each; dropped when the transaction ends.
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
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)
RESULT_COLUMNS = tuple(c.name for c in RESULTS.columns)
# The columns the move copies into `requests` (text .. usage_estimated).
MOVED_COLUMNS = RESULT_COLUMNS[1:7]
CREATE_RESULTS = str(CreateTable(RESULTS).compile(dialect=postgresql.dialect()))
COPY_RESULTS = f"COPY {RESULTS.name} ({', '.join(RESULT_COLUMNS)}) FROM STDIN"

# id, text, finish_reason, prompt_tokens, completion_tokens, usage_estimated, cost_usd,
# standard_cost_usd: one answer, priced (the job id is added here).
AnswerRow = tuple[str, str | None, str | None, int, int, bool, Decimal, Decimal]


def succeed_in_bulk(
    session: Session, job_id: str, model: str, answers: Iterable[AnswerRow]
) -> tuple[int, Decimal]:
    """Move the job's `batched` rows among `answers` to succeeded, ledger them and write their
    webhooks. Returns (rows moved, their cost)."""
    ids = _copy(session, job_id, answers)
    if not ids:
        return 0, Decimal(0)
    moved = move_from_statement(
        RESULTS,
        Status.SUCCEEDED,
        columns=MOVED_COLUMNS,
        from_=[Status.BATCHED],
        where=Request.batch_job_id == RESULTS.c.job_id,
        error=None,
    )
    count, total = record_moved(
        session,
        moved.returning(Request.id, Request.tenant).cte("moved"),
        RESULTS,
        model=model,
        route="batch",
    )
    if count:
        request_ended(session, ids, Status.SUCCEEDED.value)  # same transaction
    return count, total


def _copy(session: Session, job_id: str, answers: Iterable[AnswerRow]) -> list[str]:
    """COPY the answers into a fresh temporary table; returns their ids."""
    ids: list[str] = []
    raw: Any = session.connection().connection.driver_connection
    with raw.cursor() as cur:
        # Probe `requests` by primary key for each of the chunk's rows: the planner's default
        # costs (random_page_cost 4) prefer hashing every batched row of the table, or
        # scanning it whole, once per chunk.
        cur.execute("SET LOCAL enable_hashjoin = off")
        cur.execute("SET LOCAL enable_mergejoin = off")
        cur.execute(CREATE_RESULTS)
        with cur.copy(COPY_RESULTS) as copy:
            for row in answers:
                ids.append(row[0])
                copy.write_row((*row, job_id))
    return ids
