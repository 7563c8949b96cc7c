"""One pub/sub reader for all of an API process's event streams.

A follower blocking on its own replay log holds a Redis connection and pays a round trip per
message; one XREAD over every followed log pays a pass over all of them (packing, Redis's own
work, the reply) each time any one of them moves. Here one connection subscribes to the
channels of the followed requests (the stream engine publishes every message on its channel in
the same script call that appends it to the log) and hands each message to its followers as it
arrives: constant work per message, however many streams are open.

The log covers what a channel cannot. A follower's position is the seq of the last message it
was handed; it reads the log itself for its first read, once its subscription is confirmed
(whatever went out before), and whenever a channel message is not the next seq (one was
missed: the connection was replaced, or Redis dropped it). Seqs count without a gap in a log
(streaming/deliver.lua), so a missed message is noticed at the next one; a missed last message
is found by the follower's look at the row (streaming/follow.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from models.stream_message import peek_seq
from sheepdog.api.batcher import Results, Rounds
from streaming.drain import drain_forever
from streaming.follow import BATCH, Entry, entries_by_key
from streaming.publisher import FIELD

log = logging.getLogger("sheepdog.api")
JOIN_WAIT_S = 2.0  # the longest a follower waits for its subscription before reading the log
PING_S = 5.0  # a quiet connection is pinged this often ...
DEAD_S = 15.0  # ... and replaced when nothing came back for this long
RETRY_S = 0.2  # the pause before connecting again
LOG_READERS = 4  # rounds of log reads under way at once
LOG_ROUND_MAX = 500  # logs one XREAD names at most


class HubFeed:
    """One follower's feed (streaming.follow.Feed) of one request: its channel through the hub,
    its log when that is not enough."""

    def __init__(self, hub: LogHub, key: str, channel: str) -> None:
        self.hub = hub
        self.key = key
        self.channel = channel.encode()
        self.last_id: bytes | str = "0-0"  # the newest entry this feed read from the log itself
        self.seq = -1  # the seq of the last message handed over (or queued)
        self.queue: list[Entry] = []
        self.ready = asyncio.Event()  # set when the queue has entries or the feed is behind
        self.behind = False  # a message may be missing: read the log before waiting again
        self.joined = False

    def offer_live(self, payload: bytes) -> None:
        """A message from the channel."""
        seq = peek_seq(payload)
        if seq is not None and seq > self.seq + 1:
            self.behind = True  # one went by unseen; the log has it, and this one
            self.ready.set()
        elif self._queue((b"", {FIELD: payload}), seq):
            self.ready.set()

    def offer_logged(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.last_id = entry[0]
            self._queue(entry, peek_seq(entry[1].get(FIELD, b"")))
        if self.queue:
            self.ready.set()

    def _queue(self, entry: Entry, seq: int | None) -> bool:
        """Queue `entry` unless the follower has it already (a message with no seq goes
        through: streaming.follow refuses it)."""
        if seq is not None and seq <= self.seq:
            return False
        self.seq = self.seq if seq is None else seq
        self.queue.append(entry)
        return True

    def _take(self) -> list[Entry]:
        out, self.queue = self.queue[:BATCH], self.queue[BATCH:]
        if not self.queue:
            self.ready.clear()
        return out

    async def _read_log(self) -> None:
        self.behind = False
        self.offer_logged(await self.hub.read_log(self.key, self.last_id))
        if not self.queue and not self.behind:
            self.ready.clear()

    async def read(self, block_ms: int | None) -> list[Entry]:
        if block_ms is not None and not self.joined:
            self.joined = True
            await self.hub.join(self)
            self.behind = True  # what went out before the subscription: from the log
        if not self.queue and (self.behind or block_ms is None):
            await self._read_log()
        if block_ms is not None:
            deadline = time.monotonic() + block_ms / 1000
            while not self.queue and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ready.wait(), left)
                if not self.queue and self.behind:
                    await self._read_log()
        return self._take()

    async def aclose(self) -> None:
        self.hub.leave(self)


class LogHub:
    """Per API process (one event loop): `feed(key, channel)` is a FeedSource for
    streaming.follow."""

    def __init__(self, redis_url: str, shared: aioredis.Redis) -> None:
        self.redis = shared  # the feeds' log reads
        self._url = redis_url
        self._feeds: dict[bytes, set[HubFeed]] = {}
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}  # asked on this connection
        self._pending: dict[bytes, bool] = {}  # subscribe (True) / unsubscribe, not yet sent
        self._wake = asyncio.Event()
        self._conn: AbstractConnection | None = None
        self._heard = 0.0  # when the connection last brought anything (monotonic)
        self._tasks: set[asyncio.Task[None]] = set()  # kept referenced while they run
        self._log_reads: Rounds[tuple[str, bytes | str], list[Entry]] = Rounds(
            self._read_round, max_size=LOG_ROUND_MAX, runners=LOG_READERS
        )

    def feed(self, key: str, channel: str) -> HubFeed:
        return HubFeed(self, key, channel)

    async def read_log(self, key: str, after: bytes | str) -> list[Entry]:
        """The entries of the log at `key` after `after` (up to BATCH), without waiting. The
        reads asked meanwhile go in one XREAD: a thousand event streams opened at once read
        their logs in a few calls, not a thousand (each wanting a pooled connection)."""
        return await self._log_reads.ask((key, after))

    async def _read_round(self, asks: list[tuple[str, bytes | str]]) -> Results[list[Entry]]:
        """One XREAD for a round's asks (another for each further ask of a key already named:
        an XREAD names a key once); Redis's error is each unanswered ask's."""
        out: Results[list[Entry]] = [[] for _ in asks]
        pending = list(range(len(asks)))
        while pending:
            named: dict[str, int] = {}
            again: list[int] = []
            for i in pending:
                if asks[i][0] in named:
                    again.append(i)
                else:
                    named[asks[i][0]] = i
            try:
                reply = await self.redis.xread({k: asks[i][1] for k, i in named.items()}, BATCH)
            except Exception as err:
                for i in pending:
                    out[i] = err
                break
            found = entries_by_key(reply)
            for key, i in named.items():
                out[i] = found.get(key, [])
            pending = again
        return out

    async def join(self, feed: HubFeed) -> None:
        """Follow `feed`'s channel; returns once the subscription is confirmed (or after
        JOIN_WAIT_S: the feed reads the log either way)."""
        if not self._tasks:
            for work in (self._run(), drain_forever(self._wake, self._take, self._send)):
                task = asyncio.create_task(work)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._feeds.setdefault(feed.channel, set()).add(feed)
        confirmed = self._confirmed.get(feed.channel)
        if confirmed is None:
            confirmed = asyncio.get_running_loop().create_future()
            self._confirmed[feed.channel] = confirmed
            self._ask(feed.channel, True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(confirmed), JOIN_WAIT_S)

    def leave(self, feed: HubFeed) -> None:
        feeds = self._feeds.get(feed.channel)
        if feeds is None or feed not in feeds:
            return
        feeds.discard(feed)
        if not feeds:
            del self._feeds[feed.channel]
            confirmed = self._confirmed.pop(feed.channel, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            self._ask(feed.channel, False)

    def _ask(self, channel: bytes, subscribe: bool) -> None:
        """Queue a SUBSCRIBE or an UNSUBSCRIBE; the last wish for a channel wins."""
        self._pending.pop(channel, None)  # re-queued at the end: the order of the wishes
        self._pending[channel] = subscribe
        self._wake.set()

    def _take(self) -> list[tuple[bytes, bool]]:
        if self._conn is None:
            return []  # a new connection subscribes to every followed channel
        batch, self._pending = list(self._pending.items()), {}
        return batch

    async def _send(self, batch: list[tuple[bytes, bool]]) -> None:
        conn = self._conn
        if conn is None:
            return
        subscribe = [channel for channel, wanted in batch if wanted]
        unsubscribe = [channel for channel, wanted in batch if not wanted]
        try:
            if unsubscribe:
                await conn.send_command("UNSUBSCRIBE", *unsubscribe, check_health=False)
            if subscribe:
                await conn.send_command("SUBSCRIBE", *subscribe, check_health=False)
        except (redis.RedisError, OSError):
            await conn.disconnect()  # the reader starts again on a new connection

    async def _run(self) -> None:
        """The reader, for the life of the loop: connect, subscribe to every followed channel,
        hand messages over; on any trouble start again on a new connection."""
        watch = asyncio.create_task(self._watch())
        try:
            while True:
                try:
                    await self._read_connection()
                except Exception as err:  # the reader outlives any error (a new connection)
                    log.warning("api: event stream reader: %r", err)
                await asyncio.sleep(RETRY_S)
        finally:
            watch.cancel()

    async def _read_connection(self) -> None:
        # Its own pool: RESP2 (a subscribed connection's replies are plain arrays), no health
        # check (a PING's reply read by redis-py would take a message), no silent reconnect.
        pool = aioredis.ConnectionPool.from_url(
            self._url,
            protocol=2,
            health_check_interval=0,
            socket_keepalive=True,
            socket_connect_timeout=5,
            retry=None,
        )
        conn = pool.make_connection()
        try:
            await conn.connect()
            self._heard = time.monotonic()
            self._conn = conn
            # Every followed channel again: what was asked on the old connection is void (a
            # follower still waiting for its confirmation gets this connection's).
            loop = asyncio.get_running_loop()
            self._confirmed = {
                c: f if (f := self._confirmed.get(c)) and not f.done() else loop.create_future()
                for c in self._feeds
            }
            self._pending = dict.fromkeys(self._feeds, True)
            self._wake.set()
            while True:
                reply = await conn.read_response(timeout=math.inf)
                self._heard = time.monotonic()
                self._handle(reply)
        finally:
            self._conn = None
            await conn.disconnect()
            await pool.aclose()

    def _handle(self, reply: Any) -> None:
        kind, channel = reply[0], reply[1]
        if kind == b"message":
            for feed in self._feeds.get(channel, ()):
                feed.offer_live(reply[2])
        elif kind == b"subscribe":
            confirmed = self._confirmed.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            for feed in self._feeds.get(channel, ()):
                feed.behind = True  # from now on nothing is missed: catch up from the log
                feed.ready.set()

    async def _watch(self) -> None:
        """Ping a quiet connection; drop one that stays silent (a half-open TCP connection
        would otherwise hold every follower's live messages)."""
        while True:
            await asyncio.sleep(PING_S)
            conn, quiet = self._conn, time.monotonic() - self._heard
            if conn is None or quiet < PING_S:
                continue
            try:
                if quiet >= DEAD_S:
                    log.warning("api: event stream reader silent for %.0fs; reconnecting", quiet)
                    await conn.disconnect()
                else:
                    await conn.send_command("PING", check_health=False)
            except (redis.RedisError, OSError):
                await conn.disconnect()
