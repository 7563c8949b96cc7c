"""Intake on the worker side: turn intake messages into `requests` rows, idempotently."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.intake import IntakeItem
from models.tables import Request, utcnow
from sheepdog.lifecycle import Status

log = logging.getLogger("sheepdog.intake")


def row_values(item: IntakeItem, status: Status = Status.QUEUED) -> dict[str, Any]:
    """Column values of a new `requests` row for an intake item."""
    request = item.request  # validated by the producer; JSON mode (strings for Decimal, dates)
    metadata = request.get("metadata") or {}
    if item.downgraded:  # the row says why a normal-priority request took the batch path
        metadata = {**metadata, "sheepdog.downgraded": "budget"}
    cap = request.get("max_cost_usd")
    deadline = request.get("deadline")
    return {
        "id": item.id,
        "idempotency_key": request.get("idempotency_key"),
        "tenant": metadata.get("tenant", "default"),
        "priority": str(request.get("priority", "normal")),
        "route": item.route,
        "escalated": item.escalated,
        "model": item.body["model"],
        "body": item.body,
        "metadata_": metadata or None,
        "max_cost_usd": Decimal(str(cap)) if cap is not None else None,
        "deadline": datetime.fromisoformat(deadline) if isinstance(deadline, str) else deadline,
        "status": status.value,
        "webhook_url": request.get("webhook_url"),
        "attempts": 0,
        "created_at": item.submitted_at,
        "updated_at": utcnow(),
        # The nightly documents job links its requests to their document (a foreign key, so
        # only that job's own tenant may set it).
        **_document_link(metadata),
    }


def _document_link(metadata: dict[str, Any]) -> dict[str, int | None]:
    if metadata.get("tenant") != "documents":
        return {"document_id": None, "document_part": None}
    return {
        "document_id": _int_or_none(metadata.get("document_id")),
        "document_part": _int_or_none(metadata.get("document_part")),
    }


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value)) if value is not None else None
    except ValueError:
        return None


def _insert_ignoring_duplicates(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(Request).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(Request).on_conflict_do_nothing()
    return insert(Request)


def parse_items(raw: Iterable[object]) -> tuple[list[IntakeItem], list[tuple[object, str]]]:
    """Split raw task payloads into valid items and (payload, reason) rejects."""
    items: list[IntakeItem] = []
    rejects: list[tuple[object, str]] = []
    for entry in raw:
        try:
            items.append(IntakeItem.model_validate(entry))
        except ValidationError as err:
            rejects.append((entry, f"malformed intake message: {err.error_count()} errors"))
    return items, rejects


def record_requests(session: Session, items: Sequence[IntakeItem]) -> int:
    """Insert rows for `items` (status queued); rows that already exist are left alone, so a
    re-delivered message changes nothing. Returns the number of new rows."""
    if not items:
        return 0
    rows = [row_values(item) for item in items]
    for row in rows:  # a Core insert takes column names: the `metadata_` attribute is `metadata`
        row["metadata"] = row.pop("metadata_")
    if session.get_bind().dialect.name == "postgresql":
        return _copy_rows(session, rows)
    stmt = _insert_ignoring_duplicates(session).returning(Request.id)
    # RETURNING counts the rows really inserted (executemany rowcount is -1 on psycopg).
    return len(session.connection().execute(stmt, rows).all())


JSON_COLUMNS = frozenset({"body", "metadata"})


def _copy_rows(session: Session, rows: list[dict[str, Any]]) -> int:
    """PostgreSQL bulk insert: COPY into a temporary table, then one INSERT ... SELECT ... ON
    CONFLICT DO NOTHING. A multi-row VALUES insert of 500 rows has ~9,000 parameters that the
    driver rewrites in Python on every message; COPY streams them instead (several times
    faster, and the intake worker is the producer's bottleneck)."""
    from psycopg.types.json import Json

    # Python-side column defaults (a Core insert would apply them; COPY does not).
    defaults = {
        c.name: c.default.arg
        for c in Request.__table__.columns
        if c.name not in rows[0] and c.default is not None and c.default.is_scalar
    }
    columns = [*rows[0], *defaults]
    names = ", ".join(f'"{c}"' for c in columns)
    raw = session.connection().connection.driver_connection
    assert raw is not None  # a live psycopg connection inside the session's transaction
    with raw.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS intake_rows "
            "(LIKE requests INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        with cur.copy(f"COPY intake_rows ({names}) FROM STDIN") as copy:
            for row in rows:
                values = {**defaults, **row}
                for c in JSON_COLUMNS:
                    if values[c] is not None:
                        values[c] = Json(values[c])
                copy.write_row([values[c] for c in columns])
        cur.execute(
            f"INSERT INTO requests ({names}) SELECT {names} FROM intake_rows "
            "ON CONFLICT DO NOTHING RETURNING id"
        )
        inserted = len(cur.fetchall())
        cur.execute("TRUNCATE intake_rows")
    return inserted
