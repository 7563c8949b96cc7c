"""The API's one reader of the replay logs (sheepdog/api/log_hub.py), against real Redis: each
follower gets its log's entries once and in order, whenever it joins and however many follow."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from core.redis_conn import new_async_redis
from sheepdog.api import log_hub
from sheepdog.api.log_hub import LogHub

# The loop's own timeout far above the reads' waits: a follower that is served at all was
# served by a wake-up (CLIENT UNBLOCK), not by the loop's XREAD timing out.
LONG_BLOCK_MS = 120_000
READ_MS = 20_000


async def _collect(feed: log_hub.HubFeed, n: int) -> list[bytes]:
    out: list[bytes] = []
    first = True
    while len(out) < n:
        entries = await feed.read(None if first else READ_MS)
        assert entries or first, f"no entry within a read's wait ({len(out)}/{n})"
        first = False
        out += [fields[b"m"] for _, fields in entries]
    return out


def test_followers_get_every_entry_once_in_order(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_hub, "BLOCK_MS", LONG_BLOCK_MS)

    async def run() -> None:
        shared = new_async_redis(redis_url)
        hub = LogHub(redis_url, shared)
        logs = [f"test:hub:{uuid.uuid4().hex}" for _ in range(20)]
        try:
            # Half the logs have entries before anyone follows (a resume reads them first).
            for key in logs[:10]:
                for i in range(5):
                    await shared.xadd(key, {"m": b"%d" % i})
            feeds = [hub.feed(key) for key in logs for _ in range(2)]  # two followers each
            readers = [asyncio.create_task(_collect(f, 30)) for f in feeds]
            for i in range(30):
                for key in logs:
                    if key in logs[:10] and i < 5:
                        continue
                    await shared.xadd(key, {"m": b"%d" % i})
                if i == 15:  # a late follower joins a blocked loop
                    late = hub.feed(logs[-1])
                    readers.append(asyncio.create_task(_collect(late, 30)))
                await asyncio.sleep(0.002)
            results = await asyncio.gather(*readers)
            for got in results:
                assert got == [b"%d" % i for i in range(30)]
            for feed in [*feeds, late]:
                await feed.aclose()
        finally:
            if logs:
                await shared.delete(*logs)
            await shared.aclose()

    asyncio.run(run())


def test_a_follower_joining_an_idle_loop_is_woken(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop blocks on one log; a follower of another log gets its entry through a wake-up."""
    monkeypatch.setattr(log_hub, "BLOCK_MS", LONG_BLOCK_MS)

    async def run() -> None:
        shared = new_async_redis(redis_url)
        hub = LogHub(redis_url, shared)
        quiet, busy = f"test:hub:{uuid.uuid4().hex}", f"test:hub:{uuid.uuid4().hex}"
        try:
            idle = hub.feed(quiet)
            assert await idle.read(None) == []
            waiting = asyncio.create_task(idle.read(READ_MS))
            await asyncio.sleep(0.05)  # the loop is blocked on `quiet` alone now
            other = hub.feed(busy)
            assert await other.read(None) == []
            reader = asyncio.create_task(other.read(READ_MS))
            await asyncio.sleep(0.05)
            await shared.xadd(busy, {"m": b"x"})
            got = await reader
            assert [fields[b"m"] for _, fields in got] == [b"x"]
            await shared.xadd(quiet, {"m": b"y"})
            assert [fields[b"m"] for _, fields in await waiting] == [b"y"]
            await idle.aclose()
            await other.aclose()
        finally:
            await shared.delete(quiet, busy)
            await shared.aclose()

    asyncio.run(run())


def test_a_follower_behind_the_read_under_way_gets_the_gap(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second follower of one log joins while the hub's XREAD runs from the first one's later
    position (a reconnect with Last-Event-ID while the old connection still follows): it must
    still get the entries between its position and the read's start, in order."""
    monkeypatch.setattr(log_hub, "BLOCK_MS", LONG_BLOCK_MS)

    async def run() -> None:
        shared = new_async_redis(redis_url)
        hub = LogHub(redis_url, shared)
        key = f"test:hub:{uuid.uuid4().hex}"
        try:
            ids = [await shared.xadd(key, {"m": b"%d" % i}) for i in range(10)]
            ahead = hub.feed(key)
            assert len(await ahead.read(None)) == 10  # at entry 9
            waiting = asyncio.create_task(ahead.read(READ_MS))  # the hub reads from entry 9
            await asyncio.sleep(0.2)
            behind = hub.feed(key)
            behind.pos = log_hub._pos(ids[3])  # has entries 0..3, as a resumed follower would
            reading = asyncio.create_task(behind.read(READ_MS))
            await asyncio.sleep(0.2)
            await shared.xadd(key, {"m": b"10"})
            got = [fields[b"m"] for _, fields in await reading]
            while got[-1] != b"10":
                got += [fields[b"m"] for _, fields in await behind.read(READ_MS)]
            assert got == [b"%d" % i for i in range(4, 11)]
            assert [fields[b"m"] for _, fields in await waiting] == [b"10"]
            await ahead.aclose()
            await behind.aclose()
        finally:
            await shared.delete(key)
            await shared.aclose()

    asyncio.run(run())


def test_a_loop_whose_last_follower_leaves_during_client_id_ends_quietly(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop's last follower leaves while the loop asks Redis for its connection's id (a
    follower served one after another, as the TTFT bench's are): the loop, finding no log
    left to read, ends instead of sending an empty XREAD (redis-py refuses one, and the pause
    after that error held up the next follower's first entry by ~0.2 s). The leave is made to
    happen inside that round trip, so the test does not depend on timing."""
    leaving: list[tuple[LogHub, log_hub.HubFeed]] = []  # the follower that leaves, its hub
    real = log_hub.new_async_redis

    def loop_connection(url: str, max_connections: int = 0) -> Any:
        conn = real(url, max_connections)
        asked = conn.client_id

        async def client_id() -> Any:
            out = await asked()
            for hub, feed in leaving:
                hub.leave(feed)
            return out

        conn.client_id = client_id
        return conn

    monkeypatch.setattr(log_hub, "new_async_redis", loop_connection)

    async def run() -> None:
        shared = new_async_redis(redis_url)
        hub = LogHub(redis_url, shared)
        try:
            for _ in range(3):
                feed = hub.feed(f"test:hub:{uuid.uuid4().hex}")
                leaving[:] = [(hub, feed)]
                hub.join(feed)  # starts the loop, which sees the follower gone
                while hub._tasks:
                    await asyncio.gather(*hub._tasks)
                assert not hub._running
        finally:
            await shared.aclose()

    with caplog.at_level("WARNING", logger="sheepdog.api"):
        asyncio.run(run())
    assert not [r.getMessage() for r in caplog.records if "replay log reader" in r.getMessage()]
