"""One reader of the replay logs for all of an API process's event streams.

A follower reading its own log blocks a Redis connection and pays a round trip per message;
a thousand followers, a thousand of each. Here one loop sends one XREAD BLOCK over every
followed log (each from the oldest position its followers hold) and hands each follower the
entries after its own position, in order; a follower's first read (and a read that must not
wait) goes straight to Redis through the shared pool. Positions are entry ids, so an entry
read both ways is handed over once. A new follower wakes the blocked loop (CLIENT UNBLOCK)
so its log is in the next XREAD at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis
import redis.asyncio as aioredis

from core.redis_conn import new_async_redis
from streaming.follow import BATCH, Entry

log = logging.getLogger("sheepdog.api")
BLOCK_MS = 1000  # the loop's longest wait: bounds a missed wake-up (see _wake)


def _pos(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


def _id(pos: tuple[int, int]) -> str:
    return f"{pos[0]}-{pos[1]}"


def _pairs(response: Any) -> list[tuple[Any, list[Entry]]]:
    if not response:
        return []
    return list(response.items()) if isinstance(response, dict) else list(response)


class HubFeed:
    """One follower's feed (streaming.follow.Feed) of one log, through the hub."""

    def __init__(self, hub: LogHub, key: str) -> None:
        self.hub = hub
        self.key = key
        self.pos = (0, 0)  # the id of the last entry handed to this follower (or queued)
        self.queue: list[Entry] = []
        self.ready = asyncio.Event()
        # The hub's read started after this feed's position (it joined while that read was under
        # way, from another follower's later position): the entries between would be skipped,
        # so the feed reads them itself first.
        self.behind = False

    def offer(self, entries: list[Entry]) -> None:
        for entry in entries:
            pos = _pos(entry[0])
            if pos > self.pos:
                self.pos = pos
                self.queue.append(entry)
        if self.queue:
            self.ready.set()

    def _take(self) -> list[Entry]:
        out, self.queue = self.queue[:BATCH], self.queue[BATCH:]
        if not self.queue:
            self.ready.clear()
        return out

    async def read(self, block_ms: int | None) -> list[Entry]:
        if self.queue:
            return self._take()
        if block_ms is None or self.behind:
            self.behind = False
            response = await self.hub.redis.xread({self.key: _id(self.pos)}, BATCH)
            for _, entries in _pairs(response):
                self.offer(entries)
            return self._take()
        self.hub.join(self)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), block_ms / 1000)
        if self.behind and not self.queue:
            return await self.read(None)
        return self._take()

    async def aclose(self) -> None:
        self.hub.leave(self)


class LogHub:
    """Per API process (one event loop): `feed(key)` is a FeedSource for streaming.follow."""

    def __init__(self, redis_url: str, shared: aioredis.Redis) -> None:
        self.redis = shared  # non-blocking reads and the wake-ups
        self._url = redis_url
        self._feeds: dict[str, set[HubFeed]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # the loop (and wake-ups), kept referenced
        self._running = False
        self._client_id: int | None = None  # the loop's connection, while it blocks
        self._read_keys: set[str] = set()  # the logs of the XREAD under way
        self._waking = False

    def feed(self, key: str) -> HubFeed:
        return HubFeed(self, key)

    def join(self, feed: HubFeed) -> None:
        feeds = self._feeds.setdefault(feed.key, set())
        new = feed not in feeds
        feeds.add(feed)
        if not self._running:  # (also a loop that died: its feeds restart it)
            self._running = True
            self._spawn(self._run())
        elif new and feed.key not in self._read_keys and not self._waking:
            self._waking = True
            self._spawn(self._wake())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def leave(self, feed: HubFeed) -> None:
        feeds = self._feeds.get(feed.key)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._feeds[feed.key]

    async def _wake(self) -> None:
        """Unblock the loop's XREAD so that it reads the new logs too. Until the loop has
        blocked (its id known, the XREAD sent) an unblock does nothing: try again shortly."""
        try:
            for _ in range(200):
                if set(self._feeds) <= self._read_keys:
                    return
                client_id = self._client_id
                if client_id is not None and await self.redis.client_unblock(client_id):
                    return
                await asyncio.sleep(0.001)
        except redis.RedisError:
            pass  # the loop's BLOCK_MS bounds the wait
        finally:
            self._waking = False

    async def _run(self) -> None:
        conn = new_async_redis(self._url, 1)
        try:
            while self._feeds:
                try:
                    await self._once(conn)
                except (redis.RedisError, OSError) as err:
                    # The followers' own reads do not wait on the hub alone: they time out
                    # and try again; the loop retries after a pause.
                    log.warning("api: replay log reader: %s", type(err).__name__)
                    self._client_id = None
                    await asyncio.sleep(0.2)
        finally:
            # Before any await: a follower joining from now on starts a new loop.
            self._client_id = None
            self._read_keys = set()
            self._running = False
            await conn.aclose()

    async def _once(self, conn: aioredis.Redis) -> None:
        # Before every XREAD: a reconnect (redis-py retries a lost connection) has a new id.
        self._client_id = int(await conn.client_id())
        starts = {key: min(f.pos for f in feeds) for key, feeds in self._feeds.items()}
        if not starts:  # the last follower left during that round trip (an empty XREAD is an
            return  # error, and the pause after one held up the next follower's first token)
        self._read_keys = set(starts)
        streams = {key: _id(pos) for key, pos in starts.items()}
        response = await conn.xread(streams, BATCH, BLOCK_MS)  # type: ignore[arg-type]
        self._read_keys = set()
        for key, entries in _pairs(response):
            name = key.decode() if isinstance(key, bytes) else key
            for feed in list(self._feeds.get(name, ())):
                if feed.pos < starts.get(name, feed.pos):
                    feed.behind = True  # joined behind this read's start: reads the gap itself
                    feed.ready.set()
                else:
                    feed.offer(entries)
