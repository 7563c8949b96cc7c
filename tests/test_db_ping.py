"""The pool pings a connection only when it has sat idle (core/db.py), on a real PostgreSQL
database of its own: the test terminates every backend of that database."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

import core.db
from core.db import get_engine, session_scope
from tests.fixtures.pg import create_database, drop_database, pg_admin_url


@pytest.fixture
def own_db() -> Iterator[str]:
    url = create_database("sheepdog_ping", migrate=False)
    try:
        yield url
    finally:
        get_engine(url).dispose()
        drop_database(url)


def _backend_pid(url: str) -> int:
    with session_scope(url) as session:
        return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate_all(url: str) -> int:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(pg_admin_url(), autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return len(rows)


def _count_pings(monkeypatch: pytest.MonkeyPatch, url: str) -> list[int]:
    dialect = get_engine(url).dialect
    calls: list[int] = []
    real = dialect.do_ping

    def counted(dbapi_conn: Any) -> bool:
        calls.append(1)
        return real(dbapi_conn)

    monkeypatch.setattr(dialect, "do_ping", counted)
    return calls


def test_a_connection_back_a_moment_ago_is_used_without_a_ping(
    own_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = _count_pings(monkeypatch, own_db)
    monkeypatch.setattr(core.db, "PING_IDLE_S", 3600.0)  # however slow the box: a moment ago
    first = _backend_pid(own_db)  # a new connection: never pinged
    assert _backend_pid(own_db) == first  # back in the pool a moment ago: no ping
    assert pings == []
    monkeypatch.setattr(core.db, "PING_IDLE_S", 0.0)  # now every return counts as idle
    assert _backend_pid(own_db) == first
    assert pings == [1]


def test_an_idle_connection_the_server_dropped_is_replaced_before_use(
    own_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _backend_pid(own_db)
    monkeypatch.setattr(core.db, "PING_IDLE_S", 0.0)
    assert _terminate_all(own_db) >= 1
    # The ping finds the connection dead: the pool connects afresh and the statement runs.
    second = _backend_pid(own_db)
    assert second != first


def test_a_connection_dropped_within_the_window_fails_once_then_the_pool_recovers(
    own_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ping inside the window: the statement meets the dead connection, as a statement
    would mid-transaction; the pool is invalidated and the next call connects afresh."""
    from sqlalchemy.exc import OperationalError

    monkeypatch.setattr(core.db, "PING_IDLE_S", 3600.0)  # however slow the box: inside it
    first = _backend_pid(own_db)
    assert _terminate_all(own_db) >= 1
    with pytest.raises(OperationalError):
        _backend_pid(own_db)
    assert _backend_pid(own_db) != first
