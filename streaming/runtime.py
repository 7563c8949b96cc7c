"""The per-process streaming runtime: ONE asyncio loop in a background thread.

Celery's threads pool gives each stream a thin thread that only hands the request to this loop
and waits. The loop holds every provider connection (AsyncOpenAI, streaming/provider_calls.py),
the batching publisher, the batching database writer (claims and ends), the cancel listener and
the batched heartbeat, so a thousand streams cost a thousand sockets and coroutines rather than
a thousand threads contending for the GIL and the connection pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis

from core import keys
from core.redis_conn import new_async_redis
from core.settings import Settings
from streaming.job import CANCELLED, LOST, StreamJob
from streaming.lookups import Lookups
from streaming.provider_calls import ProviderClients
from streaming.publisher import Publisher
from streaming.store import touch_heartbeats
from streaming.writer import Writer

log = logging.getLogger("sheepdog.streaming.runtime")

T = TypeVar("T")
SWITCH_INTERVAL_S = 0.0005


class Runtime:
    """The loop thread and what lives on it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        # The loop shares the GIL with the Celery consumer, its task threads and the writer's
        # threads; at the default 5 ms switch interval a busy one holds the loop (and every
        # chunk waiting on it) for up to 5 ms. 0.5 ms bounds that wait (p99 per-chunk delay).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # Record each stream's stage times in Redis (bench/bench_stream.py's TTFT breakdown).
        self.trace = bool(os.environ.get("SHEEPDOG_STREAM_TRACE"))
        self.jobs: dict[str, StreamJob] = {}
        self.loop = _new_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="sheepdog-stream-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the streaming event loop did not start")

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._setup())
        self._ready.set()
        self.loop.run_forever()

    async def _setup(self) -> None:
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
        )
        self._tasks = [
            asyncio.create_task(self.publisher.run(), name="publisher"),
            asyncio.create_task(self.lookups.run(), name="lookups"),
            asyncio.create_task(self.writer.run_claims(), name="claims"),
            asyncio.create_task(self.writer.run_ends(), name="ends"),
            asyncio.create_task(self._cancel_listener(), name="cancel-listener"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]

    # -- called from task threads --------------------------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def register(self, request_id: str, body: dict[str, Any]) -> StreamJob:
        """A job for `request_id`, known to the cancel listener from now on (task thread)."""
        job = StreamJob(self, request_id, body, asyncio.Future(loop=self.loop))
        # A job already here for the same id (its row was taken back and sent again) is kept
        # as `previous`: stopped if this one claims the row, back in place if it does not.
        job.previous = self.jobs.get(request_id)
        self.jobs[request_id] = job  # before any cancel check, so a cancel cannot slip between
        return job

    def forget(self, job: StreamJob) -> None:
        """Drop a finished job (task thread)."""
        job.finished = True
        if self.jobs.get(job.request_id) is job:
            previous = job.previous
            if previous is not None and not previous.finished:
                self.jobs[job.request_id] = previous
            else:
                del self.jobs[job.request_id]
        job.previous = None

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
    longest a live stream may go without a chunk)."""
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


def _new_loop() -> asyncio.AbstractEventLoop:
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings) -> Runtime:
    """The process's runtime, started on first use (after a fork: a fresh one)."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = Runtime(settings)
        return _runtime
