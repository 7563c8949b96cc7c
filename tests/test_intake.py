"""Intake through a real worker: low priority lands as a queued row; idempotent resubmits."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from sqlalchemy import func, make_url, select

from core.db import session_scope
from core.errors import IdempotencyConflict
from models.tables import Request


def low(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "sheepdog-mini",
        "messages": [{"role": "user", "content": prompt}],
        "priority": "low",
        **extra,
    }


def wait_rows(db_url: str, ids: list[str], timeout: float = 30) -> list[Request]:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(db_url) as session:
            rows = list(session.scalars(select(Request).where(Request.id.in_(ids))))
        if len(rows) == len(set(ids)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


@pytest.fixture(scope="module")
def intake_worker(stack):  # type: ignore[no-untyped-def]
    """A worker on the default queue only, so no batch flush touches the rows under test."""
    proc = stack.start_worker(queues="default", concurrency=4, name="intake")
    yield proc
    proc.stop()


def test_low_priority_submit_becomes_a_queued_row(stack_client, intake_worker, stack) -> None:  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex
    rid = stack_client.submit(low(f"summarise {tag}", metadata={"tenant": "acme"}))
    assert rid.startswith("req_") and len(rid) == 36
    [row] = wait_rows(stack.env["SHEEPDOG_DATABASE_URL"], [rid])
    assert (row.status, row.route, row.priority, row.tenant) == ("queued", "batch", "low", "acme")
    assert row.body["messages"][0]["content"] == f"summarise {tag}"
    view = stack_client.get(rid)
    assert view is not None and view.status == "queued" and view.usage is None


def test_idempotent_resubmit_returns_the_first_id(stack_client, intake_worker, stack) -> None:  # type: ignore[no-untyped-def]
    key = f"idem-{uuid.uuid4().hex}"
    first = stack_client.submit(low("one", idempotency_key=key))
    again = stack_client.submit(low("one", idempotency_key=key))  # the same request again
    in_bulk = stack_client.submit_many([low("one", idempotency_key=key), low("four")])
    assert again == first == in_bulk[0]
    # The same key for a different request is a conflict (IETF Idempotency-Key draft).
    with pytest.raises(IdempotencyConflict, match=key):
        stack_client.submit(low("two, different body", idempotency_key=key))
    rows = wait_rows(stack.env["SHEEPDOG_DATABASE_URL"], [first, in_bulk[1]])
    assert len(rows) == 2
    with session_scope(stack.env["SHEEPDOG_DATABASE_URL"]) as session:
        n = session.scalar(select(func.count()).where(Request.idempotency_key == key))
    assert n == 1


def test_a_resend_while_the_first_submit_is_under_way(stack_client, intake_worker, stack) -> None:  # type: ignore[no-untyped-def]
    """A resend was answered with the first submit's id as soon as the key was seen held: an
    id whose row did not exist yet, or never would (the first submit refused by a budget, or
    dead). Now: the first id once its row exists; before, an in-progress conflict; a claim over
    a minute old with no row is taken over. The first submit is held open by its claim alone."""
    import redis

    from core import keys
    from intake.idempotency import IDEMPOTENCY_TTL_S, STALE_CLAIM_S, fingerprint

    settings = stack_client.settings
    r = redis.Redis.from_url(settings.redis_url)
    key = f"idem-{uuid.uuid4().hex}"
    request = low("under way", idempotency_key=key)
    first = stack_client.prepare(request)  # its claim, as a submit makes it before its row
    stored = keys.of(settings).idempotency(key)
    claim = f"{first.id} {fingerprint(first)}"
    r.set(stored, claim, ex=IDEMPOTENCY_TTL_S)
    with pytest.raises(IdempotencyConflict, match="still under way") as err:
        stack_client.submit(request)
    assert err.value.in_progress and err.value.first_id == first.id
    with pytest.raises(IdempotencyConflict, match="different request"):  # a conflict all the same
        stack_client.submit(low("another body", idempotency_key=key))
    assert r.get(stored) == claim.encode()  # left to the first submit

    # That submit died before its row: its claim's age, read from its TTL in Redis.
    r.set(stored, claim, ex=IDEMPOTENCY_TTL_S - STALE_CLAIM_S - 10)
    taken, again = stack_client.submit_many([request, request])  # twice in one call
    assert taken == again != first.id and stack_client.get(taken) is not None
    assert stack_client.submit(request) == taken  # its row exists: answered at once

    # A submit lets go only of a claim still its own (it deleted a takeover's).
    from intake.idempotency import release_claims

    release_claims([first], settings)
    assert r.get(stored).startswith(taken.encode())
    r.set(stored, claim, ex=60)
    release_claims([first], settings)
    assert r.get(stored) is None

    # The same key twice in one call for different requests names no id (none will exist).
    twice = f"idem-{uuid.uuid4().hex}"
    with pytest.raises(IdempotencyConflict, match="came twice in this call"):
        stack_client.submit_many([low("a", idempotency_key=twice), low("b", idempotency_key=twice)])
    assert r.get(keys.of(settings).idempotency(twice)) is None


@pytest.mark.parametrize("priority", ["low", "high"])
def test_a_resend_after_redis_lost_the_key_gets_the_first_id(  # type: ignore[no-untyped-def]
    stack_client, intake_worker, stack, priority: str
) -> None:
    """Redis restarted empty (or a claim let go after a commit the caller did not see): the
    resend claimed the key anew, its row was dropped by the table's unique key, and it was
    answered with its own id, which never existed (404 for good; the key then stuck in
    409s). It is answered with the id of the row that holds the key, and the claim points
    there again."""
    import redis

    from core import keys

    settings = stack_client.settings
    r = redis.Redis.from_url(settings.redis_url)
    key = f"idem-lost-{uuid.uuid4().hex}"
    request = {**low("lost key", idempotency_key=key), "priority": priority}
    first = stack_client.submit(request)
    stored = keys.of(settings).idempotency(key)
    r.delete(stored)  # as a Redis restarted without its data
    assert stack_client.submit(request) == first
    assert r.get(stored).startswith(f"{first} ".encode())  # answered from Redis again
    assert stack_client.submit_many([request, low("other")])[0] == first
    with session_scope(stack.env["SHEEPDOG_DATABASE_URL"]) as session:
        n = session.scalar(select(func.count()).where(Request.idempotency_key == key))
    assert n == 1


def test_submit_many_in_bulk(stack_client, intake_worker, stack) -> None:  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex
    ids = stack_client.submit_many([low(f"{tag} {i}") for i in range(1200)])
    assert len(set(ids)) == 1200
    rows = wait_rows(stack.env["SHEEPDOG_DATABASE_URL"], ids)
    assert len(rows) == 1200
    assert {r.status for r in rows} == {"queued"}


def test_intake_on_sqlite(stack, sqlite_url) -> None:  # type: ignore[no-untyped-def]
    from core.settings import Settings
    from sheepdog.client import Client

    # Queues of its own (a key prefix), so the PostgreSQL workers cannot take the message.
    prefix = stack.env["SHEEPDOG_BROKER_PREFIX"] + "sqlite:"
    env = {"SHEEPDOG_DATABASE_URL": sqlite_url, "SHEEPDOG_BROKER_PREFIX": prefix}
    proc = stack.start_worker(queues="default", concurrency=2, name="intake-sqlite", env=env)
    try:
        settings = Settings(
            redis_url=stack.env["SHEEPDOG_REDIS_URL"], broker_prefix=prefix, database_url=sqlite_url
        )
        rid = Client(settings).submit(low("on sqlite"))
        [row] = wait_rows(sqlite_url, [rid])
        assert row.status == "queued"
    finally:
        proc.stop()


def test_redelivered_intake_inserts_nothing_twice(db_url: str) -> None:
    from lifecycle.record import record_requests
    from sheepdog.client import Client

    item = Client().prepare(low("again"))
    with session_scope(db_url) as session:
        assert record_requests(session, [item]) == 1
    with session_scope(db_url) as session:
        assert record_requests(session, [item]) == 0


@pytest.mark.parametrize("size", [1, 100, 101])
def test_both_bulk_forms_write_the_same_rows(db_url: str, size: int) -> None:
    """PostgreSQL writes up to JSON_ROWS_MAX rows in one statement (the rows one JSON text) and
    more through COPY; either way every column is the one the item maps to, and a value past a
    column's limit is refused, not truncated."""
    from lifecycle.record import JSON_ROWS_MAX, record_requests, record_safely, row_values
    from sheepdog.client import Client

    assert JSON_ROWS_MAX == 100  # the sizes above straddle it
    run = uuid.uuid4().hex[:8]
    client = Client()
    extra = {
        "deadline": "2030-01-02T03:04:05+00:00",
        "max_cost_usd": "0.125",
        "metadata": {"tenant": "acme", "team": "ü ✓"},
    }
    items = [
        client.prepare(
            # 100 rows carry a NUL (text cannot hold one: those rows take COPY, as 101 do)
            low(
                f"rows {run} {i}{chr(0) if size == 100 else ''}",
                idempotency_key=f"k-{run}-{i}",
                **extra,
            )
        )
        for i in range(size)
    ]
    with session_scope(db_url) as session:
        assert record_requests(session, items) == size
    with session_scope(db_url) as session:
        rows = {
            r.id: r
            for r in session.scalars(select(Request).where(Request.id.in_([i.id for i in items])))
        }
    assert len(rows) == size
    for item in items:
        want, row = row_values(item), rows[item.id]
        for name in (
            "idempotency_key",
            "tenant",
            "priority",
            "route",
            "lane",
            "model",
            "body",
            "max_cost_usd",
            "deadline",
            "status",
            "attempts",
            "escalated",
            "webhook_url",
            "created_at",
            "usage_estimated",
        ):
            got, expected = getattr(row, name), want.get(name, getattr(row, name))
            assert got == expected, (name, got, expected)
        assert row.metadata_ == want["metadata_"]
        assert row.text is None and row.finished_at is None
    # One row the column refuses (an idempotency key past its 200 characters) fails alone.
    more = [client.prepare(low(f"more {run} {i}")) for i in range(size + 1)]
    more[0].request["idempotency_key"] = "k" * 300
    with session_scope(db_url) as session:
        recorded = record_safely(session, more)
    with session_scope(db_url) as session:
        got = {
            r.id: r
            for r in session.scalars(select(Request).where(Request.id.in_([i.id for i in more])))
        }
    if "postgresql" in db_url:
        assert recorded.failed == [more[0].id], recorded
        assert got[more[0].id].status == "failed" and got[more[0].id].idempotency_key is None
        assert "could not be stored" in (got[more[0].id].error or "")
    assert all(got[i.id].status == "queued" for i in more[1:])


def test_the_bulk_is_undone_with_its_session(db_url: str) -> None:
    """The producer's write is one transaction with whatever else the session does: until its
    commit nothing is stored, so a failure before it (the producer then says "not stored")
    leaves no row behind. (A self-committing insert would store rows the caller was told were
    not; measured and not taken, see the README's front-door figures.)"""
    from lifecycle.record import record_requests, record_safely
    from sheepdog.client import Client

    run = uuid.uuid4().hex[:8]
    client = Client()
    bulk = [client.prepare(low(f"undone {run} {i}")) for i in range(3)]
    later = client.prepare(low(f"later {run}"))
    with pytest.raises(RuntimeError), session_scope(db_url) as session:
        assert record_safely(session, bulk).created == 3
        assert record_requests(session, [later]) == 1
        raise RuntimeError("the write fails before its commit")
    with session_scope(db_url) as session:
        stored = session.scalars(
            select(Request.id).where(Request.id.in_([i.id for i in [*bulk, later]]))
        ).all()
    assert stored == [], stored


def test_a_connection_lost_in_the_bulk_write_is_retried_by_the_intake_task(pg_url: str) -> None:
    """The bulk forms write through psycopg's own cursor: a connection lost there raises the
    driver's error, which the session's rollback on the dead connection then replaces with
    SQLAlchemy's OperationalError, and that is what the intake task retries (a task that failed
    is acknowledged, and its message with it). The driver's own OperationalError is not retried
    as such: it also covers errors no retry mends (a program limit exceeded), and the retries
    never end. The connection is really cut: its backend is terminated between the pool's
    checkout and the write."""
    import psycopg
    from sqlalchemy import event

    from core.db import get_engine
    from lifecycle.record import record_safely
    from sheepdog.client import Client
    from tasks.intake import intake
    from tests.fixtures.pg import pg_admin_url

    client = Client()
    items = [client.prepare(low(f"cut {uuid.uuid4().hex[:8]} {i}")) for i in range(3)]
    engine = get_engine(pg_url)

    def cut(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        with psycopg.connect(pg_admin_url(), autocommit=True) as other:
            other.execute(
                "SELECT pg_terminate_backend(%s, 5000)", (dbapi_connection.info.backend_pid,)
            )

    event.listen(engine, "checkout", cut)
    try:
        with pytest.raises(Exception) as caught, session_scope(pg_url) as session:
            record_safely(session, items)
    finally:
        event.remove(engine, "checkout", cut)
    first = caught.value.__context__
    assert isinstance(first, psycopg.OperationalError), repr(first)  # the driver's, in the cursor
    assert isinstance(caught.value, tuple(intake.autoretry_for)), repr(caught.value)


def test_a_commit_the_caller_did_not_see_is_answered_with_its_ids(stack) -> None:  # type: ignore[no-untyped-def]
    """The connection to PostgreSQL is lost as the submit's COMMIT is answered: the rows are
    written, so the caller gets their ids, and the stream sent is not cancelled (it was: the
    caller got a 503, and its resend then the id of a request that ended `cancelled`)."""
    import redis

    from core import keys
    from core.settings import Settings
    from sheepdog.client import Client
    from tests.fixtures.tcp_proxy import tcp_proxy

    database = stack.env["SHEEPDOG_DATABASE_URL"]
    base = make_url(database)
    assert base.port is not None
    with tcp_proxy(base.port) as proxy:
        proxied = base.set(host="127.0.0.1", port=proxy.port, query={"sslmode": "disable"})
        settings = Settings(
            redis_url=stack.env["SHEEPDOG_REDIS_URL"],
            # Queues of its own: no worker takes the stream message; its flags are what count.
            broker_prefix=stack.env["SHEEPDOG_BROKER_PREFIX"] + "unseen:",
            database_url=proxied.render_as_string(hide_password=False),
        )
        client = Client(settings)
        tag = uuid.uuid4().hex
        client.submit(low(f"{tag} first"))  # which tenants have budgets: read, and cached
        stream = {**low(f"{tag} stream", idempotency_key=f"unseen-{tag}"), "priority": "high"}
        proxy.drop_when = b"COMMIT\x00"  # PostgreSQL's CommandComplete after the commit
        ids = client.submit_many([stream, low(f"{tag} low")])
        assert proxy.dropped == 1
        assert client.submit(stream) == ids[0]  # the resend: the same request
    rows = wait_rows(database, ids, timeout=5)
    assert {r.id: r.status for r in rows} == dict.fromkeys(ids, "queued")
    flags = redis.Redis.from_url(settings.redis_url)
    assert not flags.exists(keys.of(settings).cancel_flag(ids[0]))
