"""The streaming claim's bulk insert of new rows, straight `streaming` (PostgreSQL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from models.tables import Request

_INSERTS: dict[tuple[str, ...], str] = {}


def insert_fresh(session: Session, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING the claim columns, through psycopg's own
    executemany (one pipelined, prepared statement per row) in the session's transaction.

    SQLAlchemy's multi-row VALUES for the same batch rebuilds a statement of ~20 parameters a
    row in Python on every flush; on a worker relaying a thousand streams that was most of the
    claim thread's time under the GIL."""
    from psycopg.types.json import Json

    # Python-side column defaults (the Core insert applied them; a plain statement does not).
    defaults = _defaults(rows[0])
    columns = (*rows[0], *defaults)
    sql = _INSERTS.get(columns)
    if sql is None:
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join(["%s"] * len(columns))
        sql = _INSERTS[columns] = (
            f"INSERT INTO requests ({names}) VALUES ({marks}) "
            "ON CONFLICT DO NOTHING RETURNING id, attempts, tenant, model"
        )
    extra = list(defaults.values())
    params = [
        [Json(v) if c in _JSON_COLUMNS and v is not None else v for c, v in row.items()] + extra
        for row in rows
    ]
    raw = session.connection().connection.driver_connection
    assert raw is not None  # a live psycopg connection inside the session's transaction
    out: list[tuple[Any, ...]] = []
    with raw.cursor() as cur:
        cur.executemany(sql, params, returning=True)
        while True:
            out.extend(cur.fetchall())
            if not cur.nextset():
                break
    return out


_JSON_COLUMNS = frozenset({"body", "metadata"})


def _defaults(row: dict[str, Any]) -> dict[str, Any]:
    return {
        c.name: c.default.arg
        for c in Request.__table__.columns
        if c.name not in row and c.default is not None and c.default.is_scalar
    }
