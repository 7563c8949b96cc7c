"""Following one request's messages from a given seq, for the HTTP front door's event streams.

Like streaming/subscriber.py it blocks on the replay log (XREAD), so the log's messages come
first and live ones after with no gap and no duplicate; unlike it, it yields the messages
themselves (seq, type), starts after any seq (`Last-Event-ID`), waits for requests that have no
log at all (low priority: the batch path publishes nothing) and ticks while idle so the caller
can keep its connection alive.

When the request has ended and the log holds no end (expired, or never written), the row's
answer is sent instead, at the next seqs: the remaining `done` if what the caller was shown
equals the stored text; else `reset` (when it may have been shown anything), the whole text as
one `token`, then `done`; `error` for a failed or cancelled row. So a follower never ends with a
text that differs from the stored answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select

from core import keys
from core.db import session_scope
from core.redis_conn import new_async_redis
from core.settings import Settings
from models.status import is_final
from models.stream_message import StreamMessage, StreamUsage
from models.tables import Request
from streaming.publisher import FIELD

BATCH = 1000
ROW_CHECK_S = 2.0  # how often an idle follower looks at the row


Entry = tuple[bytes, dict[bytes, bytes]]  # a replay log entry: (its id, its fields)


class Feed(Protocol):
    """One follower's reader of one replay log: the entries after the last one it returned."""

    async def read(self, block_ms: int | None) -> list[Entry]:
        """The next entries (up to BATCH), waiting up to `block_ms` for one (None: no wait)."""
        ...

    async def aclose(self) -> None: ...


FeedSource = Callable[[str, str], Feed]
"""A feed of the log at this key (and the channel its messages are published on), from its
start."""


def entries_by_key(response: Any) -> dict[str, list[Entry]]:
    """The entries of an XREAD reply, by log key (RESP3 answers a dict, RESP2 a list); a log
    with nothing new is left out."""
    pairs = response.items() if isinstance(response, dict) else response or ()
    return {(k.decode() if isinstance(k, bytes) else k): list(v) for k, v in pairs}


def entries_of(response: Any) -> list[Entry]:
    """The entries of an XREAD reply over one log."""
    return [entry for entries in entries_by_key(response).values() for entry in entries]


class _OwnFeed:
    """A feed reading through a Redis connection of its own (XREAD BLOCK holds it)."""

    def __init__(self, url: str, key: str) -> None:
        self._client = new_async_redis(url)
        self._key = key
        self._last: bytes | str = "0-0"

    async def read(self, block_ms: int | None) -> list[Entry]:
        out = entries_of(await self._client.xread({self._key: self._last}, BATCH, block_ms))
        if out:
            self._last = out[-1][0]
        return out

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True)
class Tick:
    """Nothing new for `keepalive_s`: the connection is idle, not dead."""


TICK = Tick()


@dataclass(frozen=True)
class StoredEnd:
    """What an ending made from a request's row needs of it."""

    status: str
    text: str | None
    error: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    usage_estimated: bool
    cost_usd: str | None


_END_COLUMNS = (
    Request.status,
    Request.text,
    Request.error,
    Request.finish_reason,
    Request.prompt_tokens,
    Request.completion_tokens,
    Request.usage_estimated,
    Request.cost_usd,
)


def load_end(database_url: str, request_id: str) -> StoredEnd | None:
    """What the row says of the request's end (its columns only: not the prompt, nor a
    deadline Python's datetime may not hold), or None when there is no row yet."""
    with session_scope(database_url) as session:
        found = session.execute(select(*_END_COLUMNS).where(Request.id == request_id)).first()
    if found is None:
        return None
    cost = found.cost_usd
    return StoredEnd(
        found.status,
        found.text,
        found.error,
        found.finish_reason,
        found.prompt_tokens,
        found.completion_tokens,
        bool(found.usage_estimated),
        format(cost, "f") if cost is not None else None,
    )


def from_row(
    request_id: str, row: StoredEnd, next_seq: int, shown: str | None
) -> list[StreamMessage]:
    """The ending of a finished request made from its row (see the module docstring); `shown`
    is the text the follower was shown, None when unknown (it resumed with no log to read)."""
    rid = request_id
    if row.status != "succeeded":
        return [
            StreamMessage(request_id=rid, seq=next_seq, type="error", error=row.error or row.status)
        ]
    text = row.text or ""
    out: list[StreamMessage] = []
    if shown != text:
        if shown != "":  # unknown, or different: drop it first
            out.append(StreamMessage(request_id=rid, seq=next_seq, type="reset"))
        if text:
            out.append(
                StreamMessage(request_id=rid, seq=next_seq + len(out), type="token", text=text)
            )
    usage = (
        StreamUsage(
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens or 0,
            estimated=row.usage_estimated,
        )
        if row.prompt_tokens is not None
        else None
    )
    out.append(
        StreamMessage(
            request_id=rid,
            seq=next_seq + len(out),
            type="done",
            usage=usage,
            cost_usd=row.cost_usd,
            finish_reason=row.finish_reason,
        )
    )
    return out


async def open_feed(
    request_id: str, settings: Settings, feeds: FeedSource
) -> tuple[Feed, list[Entry]]:
    """A feed of the request's log and its first read (no wait), for `follow(opened=...)`;
    the feed is closed again if the read fails."""
    names = keys.of(settings)
    feed = feeds(names.replay_log(request_id), names.stream_channel(request_id))
    try:
        return feed, await feed.read(None)
    except BaseException:
        await feed.aclose()
        raise


async def follow(
    request_id: str,
    settings: Settings,
    *,
    after: int = -1,
    max_s: float = 3600.0,
    keepalive_s: float = 15.0,
    row_known_open: bool = False,
    feeds: FeedSource | None = None,
    opened: tuple[Feed, list[Entry]] | None = None,
) -> AsyncGenerator[StreamMessage | Tick, None]:
    """The request's messages with seq > `after`, ending after `done` or `error`; TICK after
    each `keepalive_s` without one. Stops (without an end) after `max_s`: resume from the last
    seq. `row_known_open`: the caller has just seen the request not ended (so the first look
    at its row can wait ROW_CHECK_S: a burst of new streams costs no burst of queries). Reads
    the log from `feeds` (a server's shared reader), else through a Redis connection of its
    own, closed at the end; or from `opened`, a feed and its first read (`open_feed`), taken
    by the caller before it answered (so Redis away is its error, not a broken stream)."""
    names = keys.of(settings)
    key = names.replay_log(request_id)
    first: list[Entry] | None = None
    if opened is not None:
        feed, first = opened
    elif feeds is not None:
        feed = feeds(key, names.stream_channel(request_id))
    else:
        feed = _OwnFeed(settings.redis_url, key)
    deadline = time.monotonic() + max_s
    expected = after + 1  # the next seq to yield
    parts: list[str] = []  # the text the caller holds (the skipped messages' included)
    shown_known = after < 0  # a resumed caller's text is known once the log is read
    next_check = time.monotonic() + ROW_CHECK_S if row_known_open else 0.0
    idle_since = time.monotonic()
    block: int | None = None  # the first read does not wait: a finished row is found at once
    again: list[Entry] = []  # read by the last look before ending from the row
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            got = False
            if first is not None:
                entries, first = first, None
            else:
                entries, again = again or await feed.read(block), []
            for _, fields in entries:
                msg = StreamMessage.parse(fields[FIELD])
                shown_known = True
                if msg.type == "token":
                    parts.append(msg.text or "")
                elif msg.type == "reset":
                    parts.clear()
                if msg.seq < expected:
                    continue  # the caller has it
                expected = msg.seq + 1
                got = True
                yield msg
                if msg.is_final:
                    return
            now = time.monotonic()
            block = max(1, int(min(remaining, keepalive_s, ROW_CHECK_S) * 1000))
            if got:
                idle_since = now
                continue
            if now >= next_check:
                next_check = now + ROW_CHECK_S
                row = await asyncio.to_thread(load_end, settings.database_url, request_id)
                if row is not None and is_final(row.status):
                    # Read the log once more: the end may have been written with the row.
                    again = await feed.read(None)
                    if not again:
                        shown = "".join(parts) if shown_known else None
                        for msg in from_row(request_id, row, expected, shown):
                            yield msg
                        return
                    continue
            if now - idle_since >= keepalive_s:
                idle_since = now
                yield TICK
    finally:
        await feed.aclose()
