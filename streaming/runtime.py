"""The stream engine's runtime: what one asyncio loop holds for every stream of the process.

The loop holds every provider connection (AsyncOpenAI, streaming/provider_calls.py), the
batching publisher, the batching database writer (claims and ends), the cancel listener and
the batched heartbeat, so a thousand streams cost a thousand sockets and coroutines rather than
a thousand threads contending for the GIL and the connection pool. It runs in the stream
engine's process (streaming/engine.py), apart from the Celery consumer that feeds it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal
from typing import Any

import redis

from core import keys
from core.redis_conn import new_async_redis
from core.settings import Settings
from streaming.call_limits import SpendLimit, read_limit
from streaming.job import CANCELLED, LOST, StreamJob
from streaming.lookups import Lookups
from streaming.provider_calls import ProviderClients
from streaming.publisher import Publisher
from streaming.store import touch_heartbeats
from streaming.writer import Writer

log = logging.getLogger("sheepdog.streaming.runtime")


class Runtime:
    """The loop's services and its jobs; made and started on the loop."""

    def __init__(self, settings: Settings, *, trace: bool = False) -> None:
        self.settings = settings
        self.trace = trace  # record each stream's stage times (bench/bench_stream.py)
        self.jobs: dict[str, StreamJob] = {}
        self.loop = asyncio.get_running_loop()

    async def start(self) -> None:
        """Open the connections, warm them, and start the loop's services."""
        s = self.settings
        self.redis = new_async_redis(s.redis_url)
        self.names = keys.of(s)
        self.providers = ProviderClients(s, self.redis, self.names)
        self.providers.warm_up()
        self.publisher = Publisher(
            self.redis, s.replay_ttl_s, self.names, self._log_lost, s.replay_done_ttl_s
        )
        self.lookups = Lookups(self.redis, self.names)
        await self.publisher.warm_up()  # connection open and script cached before any stream
        self.writer = Writer(
            s.database_url,
            # A database call that takes this long is taken to hang; a batch is sent again for
            # this long while the database is away (the heartbeat gives the row up earlier).
            call_timeout_s=max(10.0, s.heartbeat_timeout_s),
            retry_s=2 * s.heartbeat_timeout_s,
            rows_first=s.producer_writes_rows,
        )
        self._tasks = [
            asyncio.create_task(self.publisher.run(), name="publisher"),
            asyncio.create_task(self.lookups.run(), name="lookups"),
            asyncio.create_task(self.writer.run_claims(), name="claims"),
            asyncio.create_task(self.writer.run_ends(), name="ends"),
            asyncio.create_task(self._cancel_listener(), name="cancel-listener"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]

    # -- jobs ----------------------------------------------------------------------------------

    def register(self, request_id: str, body: dict[str, Any]) -> StreamJob:
        """A job for `request_id`, known to the cancel listener from now on."""
        job = StreamJob(self, request_id, body, asyncio.Future(loop=self.loop))
        # A job already here for the same id (its row was taken back and sent again) is kept
        # as `previous`: stopped if this one claims the row, back in place if it does not.
        job.previous = self.jobs.get(request_id)
        self.jobs[request_id] = job  # before any cancel check, so a cancel cannot slip between
        return job

    def forget(self, job: StreamJob) -> None:
        """Drop a finished job."""
        job.finished = True
        if self.jobs.get(job.request_id) is job:
            previous = job.previous
            if previous is not None and not previous.finished:
                self.jobs[job.request_id] = previous
            else:
                del self.jobs[job.request_id]
        job.previous = None

    async def spend_limit(self, request_id: str, needed: Decimal) -> SpendLimit | None:
        """The request's cost cap or budget hold, the hold grown toward `needed`
        (streaming/call_limits.py); None when the database does not answer: that call keeps
        its own max_tokens, and the next one reads again."""
        try:
            return await self.writer.on_end_thread(read_limit, self.settings, request_id, needed)
        except Exception as err:
            log.warning("%s: cost cap and hold not read (%r); call not bounded", request_id, err)
            return None

    # -- loop services -------------------------------------------------------------------------

    def _log_lost(self, request_id: str, token: int) -> None:
        """Redis lost a stream's replay log (restarted empty): its job starts the answer again
        in a new log, so no follower is shown a log that begins past its start."""
        job = self.jobs.get(request_id)
        if job is not None and job.token == token:
            job.log_lost()

    async def _cancel_listener(self) -> None:
        """Stop in-flight streams named on the cancel channel (reconnects on Redis errors)."""
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.names.cancel_channel)
                async for message in pubsub.listen():
                    data = message.get("data")
                    rid = data.decode() if isinstance(data, bytes) else str(data)
                    job = self.jobs.get(rid)
                    if job is not None:
                        log.info("%s: cancel requested; stopping the stream", rid)
                        job.stop(CANCELLED)
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as err:
                log.warning("cancel listener lost Redis (%s); reconnecting", err)
                await asyncio.sleep(0.5)

    async def _heartbeat(self) -> None:
        """One UPDATE per interval for the streams of this process that made progress; a
        stream whose row was taken back (janitor) is stopped without writing anything.

        A heartbeat says the stream moves, not that the process lives: a job counts while it
        is within the allowance of its last state change (an attempt in flight within its
        timeouts, a backoff) or published since the last round. A job waiting on anything else,
        e.g. the database, stops being refreshed, so the janitor takes its row back and the
        fencing token (attempts) keeps this one from writing it."""
        interval = self.settings.heartbeat_interval_s
        idle = self.settings.stream_idle_timeout_s
        while True:
            await asyncio.sleep(interval)
            owned = progressing(self.jobs, time.monotonic(), idle)
            if not owned:
                continue
            try:
                alive = await self.writer.on_end_thread(
                    touch_heartbeats, self.settings.database_url, owned
                )
            except Exception as err:  # the database may be away a while; try again next round
                log.warning("heartbeat update failed: %r", err)
                continue
            for rid in set(owned) - alive:
                gone = self.jobs.get(rid)
                if gone is not None and gone.task is not None and not gone.task.done():
                    log.warning("%s: row taken back by another worker; stopping", rid)
                    gone.stop(LOST)


def progressing(jobs: dict[str, StreamJob], now: float, idle_s: float) -> dict[str, int]:
    """The owned jobs (id -> attempts) that made progress: within the allowance of their last
    state change, or published since the last round (which extends it by the idle limit, the
    longest a live stream may go without a text)."""
    owned: dict[str, int] = {}
    for rid, job in list(jobs.items()):
        if job.grant is None:
            continue
        if job.seq != job.beat_seq:  # published since the last round
            job.beat_seq = job.seq
            job.live_until = max(job.live_until, now + idle_s)
        if now < job.live_until:
            owned[rid] = job.grant.attempts
            job.stalled = False
        elif not job.stalled:
            job.stalled = True
            log.warning("%s: no progress; its heartbeat is no longer refreshed", rid)
    return owned
