"""Delivery of stream messages: PUBLISH on the request's channel and XADD to its replay log.

One `Publisher` per worker process batches the messages of every stream into one script call
per round trip: a flush starts as soon as a message is pending and whatever arrives meanwhile
goes into the next one, so latency stays at one round trip while throughput grows with load (an
unpipelined PUBLISH costs ~125 us here; a message inside a batch a few us).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path

import redis
import redis.asyncio as aioredis

from core import keys
from models.stream_message import StreamMessage
from streaming.drain import drain_forever

log = logging.getLogger("sheepdog.streaming.publisher")

FIELD = b"m"  # the replay log entry's one field: the message bytes


# One script call delivers a whole flush, each message fenced by its attempt (see the script).
# One command and one reply instead of two or three per message keeps the worker's share of the
# cost (packing and parsing in Python) per flush.
@functools.cache
def deliver_script() -> str:
    return Path(__file__).with_name("deliver.lua").read_text()


class Mode(IntEnum):
    """How a message is fenced (streaming/deliver.lua)."""

    WORKER = 0  # refused once a later attempt has published
    TAKE_OVER = 1  # refused unless every attempt that published is older (the janitor's reset)
    FINAL = 2  # done/error: nothing goes out after it


_Entry = tuple[str, bytes, int, Mode, "asyncio.Future[int] | None"]

RESTARTS = 1024  # restarts of one attempt a fencing token has room for
REFUSED = -1  # the fence refused the message: a later attempt publishes, or the log has ended
LOG_LOST = -2  # the log's start is gone (Redis lost its data): the answer must start again


def fence_token(attempts: int, restart: int = 0) -> int:
    """The fencing token of a message: the row's attempts (the janitor's take-overs), then the
    worker's restarts of that attempt in a new log (after Redis lost the old one)."""
    return attempts * RESTARTS + min(restart, RESTARTS - 1)


class Publisher:
    """Batches PUBLISH + XADD (+ EXPIRE once per log per flush, and at its last message) of all
    streams of a process."""

    def __init__(
        self,
        client: aioredis.Redis,
        ttl_s: int,
        names: keys.Keys,
        on_log_lost: Callable[[str, int], None] | None = None,
        done_ttl_s: int | None = None,
    ) -> None:
        self._client = client
        self._names = names
        self._on_log_lost = on_log_lost  # (request id, fencing token) of a LOG_LOST message
        self._ttl = ttl_s
        self._done_ttl = done_ttl_s
        self._pending: list[_Entry] = []
        self._wake = asyncio.Event()
        self._script = client.register_script(deliver_script())
        self.flushes = 0
        self.messages = 0
        self.refused = 0  # messages of superseded attempts, or after the end

    async def warm_up(self) -> None:
        """Open the connection and load the script, so the first flush is a plain one."""
        with contextlib.suppress(redis.RedisError, OSError):
            await self._script(keys=[], args=[self._ttl])

    def put(self, request_id: str, payload: bytes, token: int) -> None:
        """Queue a message under fencing token `token` (on the loop only); the flusher sends it
        with the next script call."""
        self._pending.append((request_id, payload, token, Mode.WORKER, None))
        self._wake.set()

    async def send(
        self, request_id: str, payload: bytes, token: int, mode: Mode = Mode.FINAL
    ) -> int:
        """Queue a message and wait until Redis has it (used for the last message); the seq it
        went out with, or REFUSED / LOG_LOST."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((request_id, payload, token, mode, done))
        self._wake.set()
        return await done

    async def run(self) -> None:
        """The flush loop; runs for the life of the process."""
        await drain_forever(self._wake, self._take, self._flush)

    def _take(self) -> list[_Entry]:
        batch, self._pending = self._pending, []
        return batch

    async def _flush(self, batch: list[_Entry]) -> None:
        names, args = _script_args(
            self._names,
            [(rid, payload, attempts, mode) for rid, payload, attempts, mode, _ in batch],
            self._ttl,
            self._done_ttl,
        )
        delay = 0.05
        while True:
            try:
                seqs: list[int] = await self._script(keys=names, args=args)
                break
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the flusher must outlive any error
                # Never drop a message: Redis coming back gets the batch, in order.
                log.warning("publish failed (%r); retrying in %.2fs", err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.flushes += 1
        self.messages += len(batch)
        for (rid, _, token, _, done), seq in zip(batch, seqs, strict=True):
            if seq == REFUSED:
                self.refused += 1
                log.info("%s: a superseded or ended stream's message was not published", rid)
            elif seq == LOG_LOST and self._on_log_lost is not None:
                self._on_log_lost(rid, token)
            if done is not None and not done.done():
                done.set_result(int(seq))


def _script_args(
    deployment: keys.Keys,
    messages: Sequence[tuple[str, bytes, int, Mode]],
    ttl_s: int,
    done_ttl_s: int | None,
) -> tuple[list[str], list[bytes | str | int]]:
    """KEYS and ARGV of streaming/deliver.lua; a log's TTL after its last message is
    `done_ttl_s` when shorter than `ttl_s`."""
    names: list[str] = []
    done = ttl_s if done_ttl_s is None else min(ttl_s, done_ttl_s)
    args: list[bytes | str | int] = [ttl_s, done]
    for request_id, payload, attempts, mode in messages:
        names += [deployment.replay_log(request_id), deployment.stream_fence(request_id)]
        args += [deployment.stream_channel(request_id), payload, attempts, int(mode)]
    return names, args


def publish_now(
    client: redis.Redis,
    deployment: keys.Keys,
    request_id: str,
    payload: bytes,
    ttl_s: int,
    attempts: int,
    mode: Mode,
    done_ttl_s: int | None = None,
) -> int:
    """Synchronous, fenced delivery of one message of attempt `attempts` for code outside a
    worker's loop (janitor, cancel); the seq it went out with, or REFUSED / LOG_LOST. A final
    message leaves the log `done_ttl_s` (default `ttl_s`)."""
    names, args = _script_args(
        deployment,
        [(request_id, payload, fence_token(attempts), mode)],
        ttl_s,
        done_ttl_s,
    )
    script = client.register_script(deliver_script())
    return int(script(keys=names, args=args)[0])  # type: ignore[index]


def last_message(client: redis.Redis, names: keys.Keys, request_id: str) -> StreamMessage | None:
    """The newest message in a request's replay log (None when the log is empty)."""
    entries = client.xrevrange(names.replay_log(request_id), count=1)
    fields = entries[0][1] if entries else None
    return StreamMessage.parse(fields[FIELD]) if fields else None


def next_seq(last: StreamMessage | None) -> int:
    return 0 if last is None else last.seq + 1
