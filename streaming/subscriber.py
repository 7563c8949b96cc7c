"""Following a streaming request: text as it arrives, from the start, whenever you subscribe.

The reader blocks on the request's replay log (XREAD BLOCK) rather than on the pub/sub
channel: the log holds every message in order, so reading it from the start and then waiting on
it gives no gap and no duplicate whether you come before, during or after the stream, with one
connection and no subscribe/replay handover. Redis wakes a blocked XREAD on the same XADD that
accompanies the PUBLISH, so it is as live as pub/sub.

`stream_text()` yields str pieces; when the worker restarts the answer (a retry after some text
was shown) it yields the `RESET` marker (an empty `Reset` string): drop what you showed.
It ends after `done` (the result is the StopIteration value and `.result`) or raises
StreamFailed on `error`, StreamTimeout when nothing ends it in time.

A gap in `seq` (Redis lost messages: restarted empty, or failed over) is never shown as an
answer: the reader drops what it showed (RESET) and gives the stored row's answer once the row
has ended, or raises StreamTimeout saying so when it does not end in time. A reader that waits
with nothing new looks at the row every ROW_CHECK_S: when the request has ended and the log
holds no end (Redis lost it after the reader's last entry, or it expired), the row's answer
ends the stream, after a RESET when what was shown differs from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal

import redis
import redis.asyncio as aioredis

from core import keys
from core.errors import SheepdogError
from core.redis_conn import get_redis, new_async_redis
from core.settings import Settings, get_settings
from models.status import FINAL
from models.stream_message import StreamMessage, StreamUsage
from streaming.follow import ROW_CHECK_S, StoredEnd, from_row, load_end
from streaming.publisher import FIELD

POLL_S = 1.0  # longest single XREAD block, so timeouts are honoured promptly
ROW_POLL_S = 0.25  # how often a reader that found a gap looks at the row
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
BATCH = 1000


class StreamFailed(SheepdogError):
    """The request ended failed or cancelled; `reason` says why."""

    def __init__(self, request_id: str, reason: str) -> None:
        self.request_id, self.reason = request_id, reason
        super().__init__(f"request {request_id} failed: {reason}")


class StreamTimeout(SheepdogError, TimeoutError):
    """The stream did not end within the timeout."""


class Reset(str):
    """Marker yielded when the answer restarts from scratch."""


RESET = Reset("")


@dataclass(frozen=True)
class StreamResult:
    """The finished answer."""

    request_id: str
    text: str
    usage: StreamUsage | None
    cost_usd: Decimal | None
    finish_reason: str | None


class _Reader:
    """State shared by the sync and async readers: position, dedupe, the text so far."""

    def __init__(self, request_id: str, timeout: float, settings: Settings | None) -> None:
        self.request_id = request_id
        self.settings = settings or get_settings()
        self.key = keys.of(self.settings).replay_log(request_id)
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.last_id: bytes | str = "0-0"
        self.expected = 0
        self.parts: list[str] = []
        self.pending: list[StreamMessage] = []
        self.checked_db = False
        self.next_row_check = time.monotonic() + ROW_CHECK_S
        self.finished = False
        self.result: StreamResult | None = None
        self.resets = 0
        self.gap: str | None = None  # set when the log lost messages: the row answers instead

    def block_ms(self) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            why = f" ({self.gap}; the stored row has not ended)" if self.gap else ""
            raise StreamTimeout(f"request {self.request_id}: no end after {self.timeout:g}s{why}")
        return max(1, int(min(remaining, POLL_S) * 1000))

    def take(self, response: list | None) -> None:  # type: ignore[type-arg]
        for _, entries in response or ():
            for entry_id, fields in entries:
                self.last_id = entry_id
                msg = StreamMessage.parse(fields[FIELD])
                if msg.seq != self.expected:  # a gap, or a log Redis lost and began again
                    self._gap(f"replay log goes from seq {self.expected - 1} to {msg.seq}")
                    return
                self.expected = msg.seq + 1
                self.pending.append(msg)

    def _gap(self, what: str) -> None:
        """What follows a gap is no answer: drop it and what was shown, wait for the row."""
        self.gap = what
        shown = bool(self.parts) or any(m.type == "token" for m in self.pending)
        self.pending.clear()
        if shown:
            self.pending.append(StreamMessage(request_id=self.request_id, seq=0, type="reset"))

    def from_gap(self, row: StoredEnd | None) -> bool:
        """After a gap: the row's answer once it has ended (True), else False (wait more)."""
        if row is None or row.status not in FINAL:
            return False
        self.from_row(row)
        return True

    def row_due(self) -> bool:
        """True when an idle reader should look at the row now (every ROW_CHECK_S)."""
        now = time.monotonic()
        if self.pending or self.gap is not None or now < self.next_row_check:
            return False
        self.next_row_check = now + ROW_CHECK_S
        return True

    def from_row(self, row: StoredEnd | None, shown: str = "") -> None:
        """A finished request whose replay log has expired or lost its end: its stored answer
        (`shown`: the text the caller was shown; a RESET first when it differs)."""
        if row is not None and row.status in FINAL:
            self.pending.extend(from_row(self.request_id, row, self.expected, shown))

    def end_after_idle(self, row: StoredEnd, again: list | None) -> None:  # type: ignore[type-arg]
        """The row ended while the reader waited: what the log's last read (`again`) brought,
        else the row's answer."""
        self.take(again)
        if not self.pending and self.gap is None:
            self.from_row(row, self.text)

    def load_row(self) -> StoredEnd | None:
        try:
            return load_end(self.settings.database_url, self.request_id)
        except Exception:  # the database is optional here: keep waiting on Redis
            return None

    def step(self) -> str | None:
        """Consume one pending message: the text to yield, RESET, or None (nothing to yield)."""
        msg = self.pending.pop(0)
        self.track(msg)
        if msg.type == "token":
            return msg.text or None
        if msg.type == "reset":
            return RESET
        self.finished = True
        if msg.type == "error":
            raise StreamFailed(self.request_id, msg.error or "failed")
        self.result = StreamResult(
            self.request_id,
            "".join(self.parts),
            msg.usage,
            Decimal(msg.cost_usd) if msg.cost_usd is not None else None,
            msg.finish_reason,
        )
        return None

    def track(self, msg: StreamMessage) -> None:
        """Keep the text shown so far (for the result, and for an end made from the row)."""
        if msg.type == "token":
            self.parts.append(msg.text or "")
        elif msg.type == "reset":
            self.parts.clear()
            self.resets += 1

    @property
    def text(self) -> str:
        """The answer so far (after any reset)."""
        return "".join(self.parts)


class TextStream(_Reader, Iterator[str]):
    """Iterator of text pieces (see the module docstring); `.result` once done."""

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while not self.finished:
            if not self.pending:
                self._read()
                continue
            piece = self.step()
            if piece is not None:
                return piece
        raise StopIteration(self.result)

    def _read(self) -> None:
        block = self.block_ms()
        if self.gap is not None:
            if not self.from_gap(self.load_row()):
                time.sleep(min(ROW_POLL_S, block / 1000))
            return
        client = get_redis(self.settings.redis_url)
        try:
            response = client.xread({self.key: self.last_id}, count=BATCH, block=block)
        except REDIS_DOWN:  # Redis restarting: try again until the deadline, or the row's end
            if self.row_due():
                self.from_row(self.load_row(), self.text)
            if not self.pending:
                time.sleep(min(ROW_POLL_S, block / 1000))
            return
        self.take(response)  # type: ignore[arg-type]
        if not self.pending and not self.checked_db and self.last_id == "0-0":
            self.checked_db = True
            self.from_row(self.load_row())
        elif self.row_due() and (row := self.load_row()) is not None and row.status in FINAL:
            again = None  # the log read once more: the end may have been written with the row
            with contextlib.suppress(*REDIS_DOWN):
                again = client.xread({self.key: self.last_id}, count=BATCH)
            self.end_after_idle(row, again)  # type: ignore[arg-type]


class AsyncTextStream(_Reader, AsyncIterator[str]):
    """The asyncio twin of TextStream (one Redis connection per stream, closed at the end)."""

    _client: aioredis.Redis | None = None

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        try:
            while not self.finished:
                if not self.pending:
                    await self._read()
                    continue
                piece = self.step()
                if piece is not None:
                    return piece
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()
        raise StopAsyncIteration

    async def _read(self) -> None:
        block = self.block_ms()
        if self.gap is not None:
            if not self.from_gap(await asyncio.to_thread(self.load_row)):
                await asyncio.sleep(min(ROW_POLL_S, block / 1000))
            return
        if self._client is None:
            self._client = new_async_redis(self.settings.redis_url)
        try:
            response = await self._client.xread({self.key: self.last_id}, count=BATCH, block=block)
        except REDIS_DOWN:  # Redis restarting: try again until the deadline, or the row's end
            if self.row_due():
                self.from_row(await asyncio.to_thread(self.load_row), self.text)
            if not self.pending:
                await asyncio.sleep(min(ROW_POLL_S, block / 1000))
            return
        self.take(response)  # type: ignore[arg-type]
        if not self.pending and not self.checked_db and self.last_id == "0-0":
            self.checked_db = True
            self.from_row(await asyncio.to_thread(self.load_row))
        elif (
            self.row_due()
            and (row := await asyncio.to_thread(self.load_row)) is not None
            and row.status in FINAL
        ):
            again = None
            with contextlib.suppress(*REDIS_DOWN):
                again = await self._client.xread({self.key: self.last_id}, count=BATCH)
            self.end_after_idle(row, again)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def stream_text(
    request_id: str, timeout: float = 300.0, settings: Settings | None = None
) -> TextStream:
    """Text of a streaming request as it arrives (replay first, then live)."""
    return TextStream(request_id, timeout, settings)


def astream_text(
    request_id: str, timeout: float = 300.0, settings: Settings | None = None
) -> AsyncTextStream:
    """The asyncio twin of stream_text()."""
    return AsyncTextStream(request_id, timeout, settings)


def events(
    request_id: str, timeout: float = 300.0, settings: Settings | None = None
) -> Iterator[StreamMessage]:
    """Every message of a request in seq order, ending with `done` or `error` (not raised)."""
    reader = TextStream(request_id, timeout, settings)
    while True:
        if not reader.pending:
            reader._read()
            continue
        msg = reader.pending.pop(0)
        reader.track(msg)
        yield msg
        if msg.is_final:
            return
