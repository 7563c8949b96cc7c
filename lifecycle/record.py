"""Intake on the worker side: turn intake messages into `requests` rows, idempotently."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import redis
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core import keys
from core.redis_conn import get_redis
from core.settings import Settings
from models.intake_message import IntakeItem
from models.status import Status
from models.tables import DOCUMENTS_TENANT, Request, max_chars, utcnow

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
        "lane": item.lane_or_route,
        "lane_reason": item.lane_reason[: max_chars("lane_reason")] or None,
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
    if metadata.get("tenant") != DOCUMENTS_TENANT:
        return {"document_id": None, "document_part": None}
    return {
        "document_id": _int_or_none(metadata.get("document_id")),
        "document_part": _int_or_none(metadata.get("document_part")),
    }


INT32_MAX = 2**31 - 1


def _int_or_none(value: object) -> int | None:
    try:
        number = int(str(value)) if value is not None else None
    except ValueError:
        return None
    return number if number is None or 0 <= number <= INT32_MAX else None


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


def in_insert_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by id, the order every insert of `requests` rows takes (the producer's
    record and the stream claim's): two inserts of overlapping rows then wait on each other
    in one order, never in a cycle (a deadlock)."""
    return sorted(rows, key=lambda row: str(row["id"]))


def record_requests(session: Session, items: Sequence[IntakeItem]) -> int:
    """Insert rows for `items` (status queued); rows that already exist are left alone, so a
    re-delivered message changes nothing. Returns the number of new rows."""
    if not items:
        return 0
    rows = in_insert_order([row_values(item) for item in items])
    for row in rows:  # a Core insert takes column names: the `metadata_` attribute is `metadata`
        row["metadata"] = row.pop("metadata_")
    if session.get_bind().dialect.name == "postgresql":
        if len(rows) > JSON_ROWS_MAX:
            return _copy_rows(session, rows)
        return _json_rows(session, rows)
    stmt = _insert_ignoring_duplicates(session).returning(Request.id)
    # RETURNING counts the rows really inserted (executemany rowcount is -1 on psycopg).
    return len(session.connection().execute(stmt, rows).all())


JSON_COLUMNS = frozenset({"body", "metadata"})
# Up to this many rows go as one INSERT ... SELECT FROM json_populate_recordset(one JSON
# text): one statement whose text is the same for 1 row or 100 (psycopg prepares it), and one
# parameter serialised by orjson, where COPY takes four statements (create the temporary
# table, copy, insert, truncate). The producer writes a few rows at a time; the intake worker's
# 500-row messages keep COPY, which streams them. Each value goes through its column type's
# input function, so a value past a column's limit is refused, as COPY and an INSERT refuse it.
JSON_ROWS_MAX = 100


def _layout(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str], str]:
    """The Python-side column defaults the rows lack (a Core insert would apply them; COPY and
    JSON do not), every column written, and their quoted names."""
    defaults = {
        c.name: c.default.arg
        for c in Request.__table__.columns
        if c.name not in rows[0] and c.default is not None and c.default.is_scalar
    }
    columns = [*rows[0], *defaults]
    return defaults, columns, ", ".join(f'"{c}"' for c in columns)


def _driver_connection(session: Session) -> Any:
    raw = session.connection().connection.driver_connection
    assert raw is not None  # a live psycopg connection inside the session's transaction
    return raw


def _as_json(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)  # numeric's input reads it exactly
    raise TypeError(f"{type(value).__name__} has no JSON form here")


def _json_rows(session: Session, rows: list[dict[str, Any]]) -> int:
    """PostgreSQL insert of a few rows in one statement, the rows one JSON array."""
    defaults, _, names = _layout(rows)
    payload = orjson.dumps([{**defaults, **row} for row in rows], default=_as_json)
    if b"\\u0000" in payload:
        # json_populate_recordset unescapes every string, and text cannot hold a NUL; a json
        # column can (COPY stores it as sent).
        return _copy_rows(session, rows)
    with _driver_connection(session).cursor() as cur:
        cur.execute(
            f"INSERT INTO requests ({names}) SELECT {names} "
            "FROM json_populate_recordset(NULL::requests, %s::json) "
            "ON CONFLICT DO NOTHING RETURNING id",
            (payload.decode(),),
        )
        return len(cur.fetchall())


def _copy_rows(session: Session, rows: list[dict[str, Any]]) -> int:
    """PostgreSQL bulk insert: COPY into a temporary table, then one INSERT ... SELECT ... ON
    CONFLICT DO NOTHING. A multi-row VALUES insert of 500 rows has ~9,000 parameters that the
    driver rewrites in Python on every message; COPY streams them instead (several times
    faster, and the intake worker is the producer's bottleneck)."""
    from psycopg.types.json import Json

    defaults, columns, names = _layout(rows)
    with _driver_connection(session).cursor() as cur:
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


# The database being away (worth the same message again later), not a row it refuses.
TRANSIENT = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)


@dataclass
class Recorded:
    """What `record_safely` did: rows created, and the requests that could not be stored as
    sent (each now a `failed` row with its reason; `unkeyed` ones without their idempotency
    key, which the caller must release)."""

    created: int = 0
    failed: list[str] = field(default_factory=list)
    unkeyed: list[IntakeItem] = field(default_factory=list)


def record_safely(session: Session, items: Sequence[IntakeItem]) -> Recorded:
    """`record_requests` in bulk; should the bulk fail for a row the database refuses (a value
    past a column's limit, a deadline it cannot hold, a broken link), each row is written on
    its own, and a row that still cannot be written fails alone with its reason rather than
    take its neighbours with it. The database being away is raised (the task retries)."""
    out = Recorded()
    # A session with nothing done yet (the producer's, the intake task's) tries the bulk in its
    # own transaction and rolls it back if refused: two round trips fewer than a savepoint.
    fresh = not session.in_transaction()
    try:
        with contextlib.nullcontext() if fresh else session.begin_nested():
            out.created = record_requests(session, items)
        return out
    except TRANSIENT:
        raise
    except Exception as err:
        if fresh:
            session.rollback()
        if len(items) > 1:
            log.warning("intake bulk of %d refused (%s); writing one by one", len(items), err)
    for item in items:
        try:
            with session.begin_nested():
                out.created += record_requests(session, [item])
            continue
        except TRANSIENT:
            raise
        except Exception as err:
            reason = f"request could not be stored: {refusal(err)}"
        log.error("%s: %s", item.id, reason)
        if record_unstorable(session, item, reason, keep_key=True):
            out.created += 1
        elif record_unstorable(session, item, reason, keep_key=False):
            out.created += 1
            out.unkeyed.append(item)
        else:  # nothing of it can be written: the log line above is all that is left
            out.unkeyed.append(item)
            continue
        out.failed.append(item.id)
    refused = sorted({*out.failed, *(item.id for item in out.unkeyed)})
    if refused:
        from costs.reservations import release

        release(session, refused)  # a request that failed spends nothing
    return out


def release_keys(settings: Settings, items: Sequence[IntakeItem]) -> None:
    """Free the idempotency keys that still name these requests (which have no row with the
    key), so a resubmit with the key is not answered with an id nobody can find."""
    client = get_redis(settings.redis_url)
    for item in items:
        key = item.request.get("idempotency_key")
        if not key:
            continue
        name = keys.of(settings).idempotency(key)

        def drop(pipe: Any, name: str = name, rid: str = item.id) -> None:
            current = pipe.get(name)
            pipe.multi()
            if current is not None and current.decode().partition(" ")[0] == rid:
                pipe.delete(name)

        try:
            client.transaction(drop, name)
        except redis.RedisError as err:
            log.error("%s: idempotency key not released (%r)", item.id, err)


def refusal(err: BaseException) -> str:
    """The database's reason in one line (the driver's message, not SQLAlchemy's wrapper)."""
    cause = getattr(err, "orig", None) or err
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first}"[:300]


def record_unstorable(session: Session, item: IntakeItem, reason: str, *, keep_key: bool) -> bool:
    """A `failed` row with only what any table can hold (id, route, model, its reason); True
    when written (or there already). The lifecycle's first status, like `queued` at intake."""
    request = item.request
    tenant = str((request.get("metadata") or {}).get("tenant", "default"))
    limit = max_chars("tenant")
    now = utcnow()
    values = {
        "id": item.id,
        "idempotency_key": request.get("idempotency_key") if keep_key else None,
        "tenant": tenant if len(tenant) <= limit and "\x00" not in tenant else "default",
        "priority": str(request.get("priority", "normal"))[:8],
        "route": item.route,
        "model": str(item.body.get("model", ""))[:100],
        "body": {"model": str(item.body.get("model", ""))[:100]},
        "status": Status.FAILED.value,
        "attempts": 0,
        "error": reason,
        "created_at": now,
        "updated_at": now,
        "finished_at": now,
    }
    try:
        with session.begin_nested():
            session.execute(_insert_ignoring_duplicates(session), [values])
        return True
    except TRANSIENT:
        raise
    except Exception as err:
        log.error("%s: not even its failure could be stored: %s", item.id, refusal(err))
        return False
