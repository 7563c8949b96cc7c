"""Database engines and sessions: SQLite embedded by default, PostgreSQL (psycopg 3)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    String,
    any_,
    cast,
    create_engine,
    event,
    literal,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InvalidatePoolError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from core.errors import DATABASE_HINT, ServiceUnavailable, redact_url


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain postgresql:// URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run beside the single writer; busy_timeout queues writers instead of
    # failing them, which is what makes SQLite's one-writer rule a safe claim lock.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


@lru_cache(maxsize=16)
def get_engine(url: str | None = None) -> Engine:
    """The engine for `url` (default: settings), one per URL per process."""
    if url is None:
        from core.settings import get_settings

        url = get_settings().database_url
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, pool_size=20, max_overflow=80, pool_recycle=1800)
    _ping_when_idle(engine)
    return engine


PING_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before use only when it has sat idle past PING_IDLE_S.

    `pool_pre_ping` pings on every checkout: one more round trip for each transaction, a
    tenth of a producer's submit and of a stream writer's flush under load. A connection
    that finished a transaction a moment ago is alive unless the server went away in that
    moment, and then the statement fails as one would mid-transaction (the callers' outage
    handling) and the pool is invalidated, as a failed ping invalidates it."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)  # None: a new connection
        if since is None or time.monotonic() - since <= PING_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as err:
            # The pool drops every connection older than now and connects afresh.
            raise InvalidatePoolError(f"ping failed: {err!r}") from err


@lru_cache(maxsize=16)
def _sessionmaker(url: str | None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_postgres(session_or_engine: Session | Engine) -> bool:
    bind = (
        session_or_engine.get_bind()
        if isinstance(session_or_engine, Session)
        else session_or_engine
    )
    return bind.dialect.name == "postgresql"


def dialect_insert(session: Session, table: Any) -> Any:
    """An INSERT into `table` in the session's dialect, which has `on_conflict_do_nothing`."""
    from sqlalchemy.dialects import postgresql, sqlite

    return (postgresql if is_postgres(session) else sqlite).insert(table)


def begin_write(session: Session) -> None:
    """Start the session's transaction as a writer. On SQLite this takes the single write lock
    now (BEGIN IMMEDIATE), so a read-then-write cannot interleave with another writer; on
    PostgreSQL row locks (FOR UPDATE) do that job, and this does nothing. Call first thing in a
    fresh session."""
    if session.get_bind().dialect.name == "sqlite":
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")


def among(session: Session, column: Any, ids: Sequence[str]) -> ColumnElement[bool]:
    """`column IN ids`; on PostgreSQL one array parameter (`= ANY(...)`) instead of thousands
    of placeholders, which is cheaper to send and to plan."""
    if is_postgres(session):
        return column == any_(cast(literal(list(ids)), ARRAY(String)))  # type: ignore[no-any-return]
    return column.in_(ids)  # type: ignore[no-any-return]


def analyze(url: str | None, table: str) -> None:
    """Refresh the planner's statistics of `table` (PostgreSQL; SQLite plans without them)."""
    if not table.isidentifier():
        raise ValueError(f"not a table name: {table!r}")
    engine = get_engine(url)
    if is_postgres(engine):
        with engine.connect() as conn:
            conn.execute(text(f"ANALYZE {table}"))
            conn.commit()


def check_database(url: str | None = None) -> None:
    """Raise ServiceUnavailable (one line) when the database cannot be reached."""
    engine = get_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError:
        raise ServiceUnavailable(
            "the database", redact_url(str(engine.url)), DATABASE_HINT
        ) from None
