"""Delivery of stream messages: PUBLISH on the request's channel and XADD to its replay log.

One `Publisher` per worker process batches the messages of every stream into one script call
per round trip: a flush starts as soon as a message is pending and whatever arrives meanwhile
goes into the next one, so latency stays at one round trip while throughput grows with load (an
unpipelined PUBLISH costs ~125 us here; a message inside a batch a few us).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import redis
import redis.asyncio as aioredis

from models.stream_message import StreamMessage
from sheepdog import keys
from streaming.drain import drain_forever

log = logging.getLogger("sheepdog.streaming.publisher")

FIELD = b"m"  # the replay log entry's one field: the message bytes

# One script call delivers a whole flush: KEYS are the replay logs (one per message), ARGV the
# TTL then (channel, payload) pairs. One command and one reply instead of two or three per
# message keeps the worker's share of the cost (packing and parsing in Python) per flush.
DELIVER = """
local ttl = ARGV[1]
local seen = {}
for i = 1, #KEYS do
  redis.call('PUBLISH', ARGV[2 * i], ARGV[2 * i + 1])
  redis.call('XADD', KEYS[i], '*', 'm', ARGV[2 * i + 1])
  if not seen[KEYS[i]] then
    seen[KEYS[i]] = true
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
return #KEYS
"""


class Publisher:
    """Batches PUBLISH + XADD (+ EXPIRE once per log per flush) of all streams of a process."""

    def __init__(
        self, client: aioredis.Redis, ttl_s: int, names: keys.Keys, done_ttl_s: int | None = None
    ) -> None:
        self._client = client
        self._names = names
        self._ttl = ttl_s
        self._done_ttl = min(ttl_s, done_ttl_s) if done_ttl_s is not None else ttl_s
        self._pending: list[tuple[str, bytes, asyncio.Future[None] | None]] = []
        self._wake = asyncio.Event()
        self._script = client.register_script(DELIVER)
        self.flushes = 0
        self.messages = 0

    async def warm_up(self) -> None:
        """Open the connection and load the script, so the first flush is a plain one."""
        with contextlib.suppress(redis.RedisError, OSError):
            await self._script(keys=[], args=[self._ttl])

    def put(self, request_id: str, payload: bytes) -> None:
        """Queue a message (loop thread only); the flusher sends it with the next pipeline."""
        self._pending.append((request_id, payload, None))
        self._wake.set()

    async def send(self, request_id: str, payload: bytes) -> None:
        """Queue a message and wait until Redis has it (used for the last message)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((request_id, payload, done))
        self._wake.set()
        await done

    async def shorten(self, request_id: str) -> None:
        """After the last message (the row already holds the answer): keep the replay log only
        done_ttl_s more. A failure only leaves the log to its full TTL."""
        if self._done_ttl >= self._ttl:
            return
        try:
            await self._client.expire(self._names.replay_log(request_id), self._done_ttl)
        except (redis.RedisError, OSError) as err:
            log.warning("%s: replay log kept its full TTL (%r)", request_id, err)

    async def run(self) -> None:
        """The flush loop; runs for the life of the process."""
        await drain_forever(self._wake, self._take, self._flush)

    def _take(self) -> list[tuple[str, bytes, asyncio.Future[None] | None]]:
        batch, self._pending = self._pending, []
        return batch

    async def _flush(self, batch: list[tuple[str, bytes, asyncio.Future[None] | None]]) -> None:
        logs: list[bytes | str] = []
        args: list[bytes | str | int] = [self._ttl]
        for request_id, payload, _ in batch:
            logs.append(self._names.replay_log(request_id))
            args.append(self._names.stream_channel(request_id))
            args.append(payload)
        delay = 0.05
        while True:
            try:
                await self._script(keys=logs, args=args)
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
        for _, _, done in batch:
            if done is not None and not done.done():
                done.set_result(None)


def publish_now(
    client: redis.Redis,
    names: keys.Keys,
    request_id: str,
    payloads: Sequence[bytes],
    ttl_s: int,
) -> None:
    """Synchronous delivery for code outside a worker's loop (janitor, cancel)."""
    with client.pipeline(transaction=False) as pipe:
        for payload in payloads:
            pipe.publish(names.stream_channel(request_id), payload)
            pipe.xadd(names.replay_log(request_id), {FIELD: payload})
        pipe.expire(names.replay_log(request_id), ttl_s)
        pipe.execute()


def last_message(client: redis.Redis, names: keys.Keys, request_id: str) -> StreamMessage | None:
    """The newest message in a request's replay log (None when the log is empty)."""
    entries = client.xrevrange(names.replay_log(request_id), count=1)
    fields = entries[0][1] if entries else None
    return StreamMessage.parse(fields[FIELD]) if fields else None


def next_seq(last: StreamMessage | None) -> int:
    return 0 if last is None else last.seq + 1
