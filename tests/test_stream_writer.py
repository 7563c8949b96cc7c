"""The streaming path's batching writer under faults: every claim and end it hands out resolves
and its flush loops outlive any exception. A real PostgreSQL database; the faults are injected
by wrapping the store's functions (a batch that raises, a database that is away, a call that
hangs) or by pointing the writer at a port nothing listens on."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg
import pytest
from sqlalchemy import select

from core.db import session_scope
from core.settings import Settings
from models.intake_message import IntakeItem
from models.status import Status
from models.tables import Request
from sheepdog.client import Client
from streaming import store
from streaming.end import End
from streaming.writer import Writer
from tests.fixtures.faults import free_port

pytestmark = pytest.mark.timeout(60)


def intake(pg_url: str, n: int) -> list[IntakeItem]:
    client = Client(Settings(database_url=pg_url))
    tag = uuid.uuid4().hex
    body = {"model": "sheepdog-mini", "priority": "high"}
    return [
        client.prepare({**body, "messages": [{"role": "user", "content": f"w {tag} {i}"}]})
        for i in range(n)
    ]


def status(pg_url: str, rid: str) -> str:
    with session_scope(pg_url) as session:
        return str(session.scalar(select(Request.status).where(Request.id == rid)))


def run(
    pg_url: str, body: Callable[[Writer], Coroutine[Any, Any, None]], **kwargs: float
) -> Writer:
    """Run `body` against a writer whose flush loops run on a fresh event loop."""

    async def main() -> Writer:
        writer = Writer(pg_url, **kwargs)
        loops = [asyncio.create_task(writer.run_claims()), asyncio.create_task(writer.run_ends())]
        try:
            await asyncio.wait_for(body(writer), 30)
            assert not any(t.done() for t in loops), "a flush loop died"
        finally:
            for t in loops:
                t.cancel()
        return writer

    return asyncio.run(main())


def done(text: str = "ok") -> End:
    return End(Status.SUCCEEDED, text, finish_reason="stop")


def test_a_batch_that_raises_is_written_one_by_one(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = intake(pg_url, 3)
    real = store.claim_many
    calls = {"n": 0}

    def once_broken(db_url: str, wanted: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the batch")
        return real(db_url, wanted, **kwargs)

    monkeypatch.setattr(store, "claim_many", once_broken)

    async def body(writer: Writer) -> None:
        got = await asyncio.gather(*(writer.claim(i.id, i) for i in items))
        claims = [c for c in got if isinstance(c, store.Claim)]
        assert len(claims) == len(items)
        costs = await asyncio.gather(
            *(writer.finish(i.id, c, done()) for i, c in zip(items, claims, strict=True))
        )
        assert costs == [None, None, None]  # no usage, no cost
        # Later flushes take the batch path again.
        more = intake(pg_url, 2)
        assert all(await asyncio.gather(*(writer.claim(i.id, i) for i in more)))

    run(pg_url, body)
    assert calls["n"] == 2
    assert {status(pg_url, i.id) for i in items} == {"succeeded"}


def test_a_flush_that_crashes_fails_its_futures_and_the_loop_goes_on(pg_url: str) -> None:
    items = intake(pg_url, 2)

    async def body(writer: Writer) -> None:
        real = writer._write

        async def crash(*_: Any) -> Any:
            writer._write = real  # type: ignore[method-assign]
            raise KeyError("not a database error")

        writer._write = crash  # type: ignore[method-assign,assignment]
        with pytest.raises(store.Unavailable):
            await writer.claim(items[0].id, items[0])
        claim = await writer.claim(items[1].id, items[1])
        assert claim is not None
        assert await writer.finish(items[1].id, claim, done()) is None

    run(pg_url, body)
    assert status(pg_url, items[1].id) == "succeeded"


def test_database_away_is_retried_then_written(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = intake(pg_url, 2)
    real = store.finish_many
    calls = {"n": 0}

    def away_at_first(db_url: str, ends: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real(db_url, ends)

    monkeypatch.setattr(store, "finish_many", away_at_first)

    async def body(writer: Writer) -> None:
        claims = await asyncio.gather(*(writer.claim(i.id, i) for i in items))
        ends = [writer.finish(i.id, c, done()) for i, c in zip(items, claims, strict=True)]  # type: ignore[arg-type]
        assert await asyncio.gather(*ends) == [None, None]

    run(pg_url, body, retry_s=10)
    assert calls["n"] == 4
    assert {status(pg_url, i.id) for i in items} == {"succeeded"}


def test_database_that_stays_away_fails_the_futures_in_bounded_time() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"  # nothing listens
    item = intake(url, 1)[0]

    async def body(writer: Writer) -> None:
        started = time.monotonic()
        with pytest.raises(store.Unavailable):
            await writer.claim(item.id, item)
        assert time.monotonic() - started < writer.max_wait_s
        # The loop is still there for the next one.
        with pytest.raises(store.Unavailable):
            await writer.claim(item.id, item)

    writer = run(url, body, retry_s=0.5, call_timeout_s=5)
    assert writer.claim_flushes == 2


def test_a_hung_call_is_abandoned_and_the_next_gets_a_fresh_thread(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = intake(pg_url, 1)
    real = store.finish_many
    calls = {"n": 0}

    def hangs_once(db_url: str, ends: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(1.5)  # as a call on a connection the driver never hears back from
            raise psycopg.OperationalError("gave up at last")
        return real(db_url, ends)

    monkeypatch.setattr(store, "finish_many", hangs_once)

    async def body(writer: Writer) -> None:
        claim = await writer.claim(items[0].id, items[0])
        assert claim is not None
        assert await writer.finish(items[0].id, claim, done()) is None

    writer = run(pg_url, body, call_timeout_s=0.3, retry_s=5)
    assert writer.abandoned_calls == 1 and calls["n"] == 2
    assert status(pg_url, items[0].id) == "succeeded"


def test_the_same_request_twice_in_a_flush(pg_url: str) -> None:
    item = intake(pg_url, 1)[0]

    async def body(writer: Writer) -> None:
        first, second = await asyncio.gather(
            writer.claim(item.id, item), writer.claim(item.id, None)
        )
        assert isinstance(first, store.Claim) and second is None
        stale = store.Claim(first.attempts + 1, first.tenant, first.model)
        # Two ends for one row at once (an old attempt's and the owner's): both resolve.
        lost = writer.finish(item.id, stale, done("old"))
        mine = writer.finish(item.id, first, done("new"))
        with pytest.raises(store.Fenced):
            await lost
        assert await mine is None
        # Nothing of that request is kept: a later claim asks the database again.
        assert await writer.claim(item.id, None) is None

    run(pg_url, body)
    with session_scope(pg_url) as session:
        row = session.scalar(select(Request).where(Request.id == item.id))
        assert row is not None and row.status == "succeeded" and row.text == "new"


# -- the runtime's in-process state (no loop needed) -----------------------------------------


def bare_runtime() -> Any:
    from streaming.runtime import Runtime

    runtime = object.__new__(Runtime)  # only .jobs and .loop are used by register/forget
    runtime.jobs = {}
    runtime.loop = asyncio.new_event_loop()
    return runtime


@pytest.mark.unit
def test_a_second_job_for_an_id_does_not_hide_the_first() -> None:
    runtime = bare_runtime()
    try:
        owner = runtime.register("r1", {})
        resent = runtime.register("r1", {})  # a resend while the owner still streams
        assert runtime.jobs["r1"] is resent and resent.previous is owner
        runtime.forget(resent)  # its claim found the row not queued
        assert runtime.jobs["r1"] is owner  # still seen by the heartbeat and the cancels
        runtime.forget(owner)
        assert "r1" not in runtime.jobs
    finally:
        runtime.loop.close()


@pytest.mark.unit
def test_heartbeat_refreshes_only_streams_that_progress() -> None:
    from streaming.job import Grant
    from streaming.runtime import progressing

    runtime = bare_runtime()
    try:
        moving, waiting, ungranted = (runtime.register(rid, {}) for rid in ("m", "w", "u"))
        for job in (moving, waiting):
            job.grant = Grant(attempts=1, next_seq=0, reset_first=False)
            job.beat_seq = job.seq  # as seen by an earlier round
        t0 = time.monotonic()
        moving.live_for(0)
        waiting.live_for(0)
        moving.seq = 5  # published since the last round
        assert progressing(runtime.jobs, t0 + 1, idle_s=2) == {"m": 1}
        # Nothing published for longer than the idle limit: no longer refreshed either.
        assert progressing(runtime.jobs, t0 + 4, idle_s=2) == {}
        waiting.live_for(10)  # e.g. an attempt in flight within its timeouts
        assert progressing(runtime.jobs, t0 + 5, idle_s=2) == {"w": 1}
        assert ungranted.grant is None
    finally:
        runtime.loop.close()


def test_an_end_committed_but_not_acknowledged_is_recognised(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    item = intake(pg_url, 1)[0]
    real = store.finish_many
    calls = {"n": 0}

    def ack_lost(db_url: str, ends: Any) -> Any:
        calls["n"] += 1
        out = real(db_url, ends)
        if calls["n"] == 1:  # committed, then the connection went before the answer
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return out

    monkeypatch.setattr(store, "finish_many", ack_lost)
    claims: list[store.Claim] = []

    async def body(writer: Writer) -> None:
        claim = await writer.claim(item.id, item)
        assert claim is not None
        claims.append(claim)
        with pytest.raises(store.Fenced):  # the retry finds the row no longer streaming
            await writer.finish(item.id, claim, done("mine"))

    run(pg_url, body, retry_s=5)
    claim = claims[0]
    assert store.ended_as(pg_url, item.id, claim, done("mine"))  # runner: publish, not LOST
    assert not store.ended_as(pg_url, item.id, claim, done("another"))
    stale = store.Claim(claim.attempts + 1, claim.tenant, claim.model)
    assert not store.ended_as(pg_url, item.id, stale, done("mine"))
