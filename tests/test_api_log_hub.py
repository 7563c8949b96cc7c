"""The API's one reader of the event streams (sheepdog/api/log_hub.py), against real Redis:
each follower gets its request's messages once and in order, whenever it joins, however many
follow, and whatever happens to the hub's connection."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.redis_conn import new_async_redis
from models.stream_message import StreamMessage, encode
from sheepdog.api import log_hub
from sheepdog.api.log_hub import HubFeed, LogHub

READ_MS = 20_000


class Stream:
    """A request's log and channel, written as the stream engine writes them (XADD + PUBLISH
    of the same message); `put(..., live=False)` logs a message whose publish went missing."""

    def __init__(self, shared: aioredis.Redis) -> None:
        self.shared = shared
        self.id = uuid.uuid4().hex
        self.key, self.channel = f"test:hub:replay:{self.id}", f"test:hub:stream:{self.id}"
        self.seq = 0

    async def put(self, live: bool = True) -> None:
        payload = encode(self.id, self.seq, "token", text=f"t{self.seq}")
        self.seq += 1
        await self.shared.xadd(self.key, {"m": payload})
        if live:
            await self.shared.publish(self.channel, payload)

    def feed(self, hub: LogHub) -> HubFeed:
        return hub.feed(self.key, self.channel)


async def _collect(feed: HubFeed, n: int) -> list[int]:
    """The seqs of the first n messages the feed hands over (as streaming.follow reads)."""
    out: list[int] = []
    first = True
    while len(out) < n:
        entries = await feed.read(None if first else READ_MS)
        first = False
        out += [StreamMessage.parse(fields[b"m"]).seq for _, fields in entries]
    return out


def _with_hub(
    redis_url: str, body: Callable[[aioredis.Redis, LogHub], Awaitable[list[Stream]]]
) -> None:
    async def run() -> None:
        shared = new_async_redis(redis_url)
        hub = LogHub(redis_url, shared)
        streams: list[Stream] = []
        try:
            streams = await body(shared, hub)
        finally:
            for task in [*hub._tasks, *hub._log_reads._runners]:
                task.cancel()
            if streams:
                await shared.delete(*(s.key for s in streams))
            await shared.aclose()

    asyncio.run(run())


def test_followers_get_every_message_once_in_order(redis_url: str) -> None:
    async def body(shared: aioredis.Redis, hub: LogHub) -> list[Stream]:
        streams = [Stream(shared) for _ in range(20)]
        # Half the requests have messages before anyone follows (a resume reads them first).
        for stream in streams[:10]:
            for _ in range(5):
                await stream.put()
        feeds = [s.feed(hub) for s in streams for _ in range(2)]  # two followers each
        readers = [asyncio.create_task(_collect(f, 30)) for f in feeds]
        while any(s.seq < 30 for s in streams):
            for stream in streams:
                if stream.seq < 30:
                    await stream.put()
            if streams[-1].seq == 15:  # a late follower joins while the others are live
                late = streams[-1].feed(hub)
                feeds.append(late)
                readers.append(asyncio.create_task(_collect(late, 30)))
            await asyncio.sleep(0.002)
        for got in await asyncio.gather(*readers):
            assert got == list(range(30))
        for feed in feeds:
            await feed.aclose()
        await asyncio.sleep(0.1)
        assert not await shared.pubsub_channels("test:hub:stream:*")  # all left: unsubscribed
        return streams

    _with_hub(redis_url, body)


def test_logs_read_together_take_a_few_calls(redis_url: str) -> None:
    """Many followers reading their logs at once (a burst of event streams opened) share XREAD
    calls, each getting its own log's entries; one log read twice at once is read in two."""

    async def body(shared: aioredis.Redis, hub: LogHub) -> list[Stream]:
        streams = [Stream(shared) for _ in range(300)]
        for i, stream in enumerate(streams):
            for _ in range(i % 4):  # some logs empty
                await stream.put()
        calls = 0
        xread = shared.xread

        async def counted(*args: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            return await xread(*args, **kw)

        shared.xread = counted  # type: ignore[method-assign]
        feeds = [s.feed(hub) for s in streams] + [streams[1].feed(hub)]
        got = await asyncio.gather(*(f.read(None) for f in feeds))
        seqs = [[StreamMessage.parse(f[b"m"]).seq for _, f in entries] for entries in got]
        assert seqs == [list(range(i % 4)) for i in range(300)] + [[0]]
        assert calls <= 4, calls
        return streams

    _with_hub(redis_url, body)


def test_a_follower_resuming_behind_another_gets_the_gap(redis_url: str) -> None:
    """A second follower of one request joins at an older seq than the first (a reconnect with
    Last-Event-ID while the old connection still follows): it gets everything after its own
    position, in order, and the first one nothing twice."""

    async def body(shared: aioredis.Redis, hub: LogHub) -> list[Stream]:
        stream = Stream(shared)
        for _ in range(10):
            await stream.put()
        ahead = stream.feed(hub)
        assert len(await ahead.read(None)) == 10  # at seq 9
        waiting = asyncio.create_task(ahead.read(READ_MS))
        await asyncio.sleep(0.1)
        behind = stream.feed(hub)
        behind.seq = 3  # has 0..3, as a resumed follower holds them
        reading = asyncio.create_task(_collect(behind, 7))
        await asyncio.sleep(0.1)
        await stream.put()
        assert await reading == list(range(4, 11))
        assert [StreamMessage.parse(f[b"m"]).seq for _, f in await waiting] == [10]
        await ahead.aclose()
        await behind.aclose()
        return [stream]

    _with_hub(redis_url, body)


def test_a_message_missing_from_the_channel_is_read_from_the_log(redis_url: str) -> None:
    async def body(shared: aioredis.Redis, hub: LogHub) -> list[Stream]:
        stream = Stream(shared)
        feed = stream.feed(hub)
        assert await feed.read(None) == []
        reading = asyncio.create_task(_collect(feed, 6))
        await asyncio.sleep(0.1)  # subscribed
        for live in (True, False, False, True, True, True):  # seqs 1 and 2 never published
            await stream.put(live)
        assert await reading == list(range(6))
        await feed.aclose()
        return [stream]

    _with_hub(redis_url, body)


def test_a_lost_connection_loses_no_message(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub's connection is killed while messages flow: it connects again, subscribes
    again, and every follower still gets every message once, in order."""
    monkeypatch.setattr(log_hub, "RETRY_S", 0.05)

    async def body(shared: aioredis.Redis, hub: LogHub) -> list[Stream]:
        streams = [Stream(shared) for _ in range(5)]
        feeds = [s.feed(hub) for s in streams]
        readers = [asyncio.create_task(_collect(f, 40)) for f in feeds]
        for i in range(40):
            if i in (10, 25):
                await _kill(shared, hub)
            for stream in streams:
                await stream.put()
            await asyncio.sleep(0.005)
        for got in await asyncio.gather(*readers):
            assert got == list(range(40))
        for feed in feeds:
            await feed.aclose()
        return streams

    _with_hub(redis_url, body)


def test_a_silent_connection_is_replaced(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that stops answering (its pings go nowhere, as on a half-open TCP
    connection) is dropped after DEAD_S and its followers served by the next one."""
    monkeypatch.setattr(log_hub, "PING_S", 0.05)
    monkeypatch.setattr(log_hub, "DEAD_S", 0.3)
    monkeypatch.setattr(log_hub, "RETRY_S", 0.05)

    async def body(shared: aioredis.Redis, hub: LogHub) -> list[Stream]:
        stream = Stream(shared)
        feed = stream.feed(hub)
        assert await feed.read(None) == []
        reading = asyncio.create_task(_collect(feed, 3))
        await stream.put()
        while hub._conn is None or feed.seq < 0:
            await asyncio.sleep(0.01)
        silent = hub._conn
        sent = silent.send_command

        async def drop_pings(*args: Any, **kwargs: Any) -> None:
            if args[0] != "PING":
                await sent(*args, **kwargs)

        silent.send_command = drop_pings  # type: ignore[method-assign]
        while hub._conn is silent or hub._conn is None:  # nothing comes back: replaced
            await asyncio.sleep(0.02)
        await stream.put()
        await stream.put()
        assert await reading == [0, 1, 2]
        await feed.aclose()
        return [stream]

    _with_hub(redis_url, body)


def _address(conn: Any) -> str:
    host, port = conn._writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


async def _kill(shared: aioredis.Redis, hub: LogHub) -> None:
    while hub._conn is None:
        await asyncio.sleep(0.005)
    await shared.execute_command("CLIENT", "KILL", "ADDR", _address(hub._conn), "SKIPME", "yes")
