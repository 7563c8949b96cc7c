"""The emulated batch executor: a job's lines as plain chat completions, under the provider's
rate limits, checkpointed line by line in Redis (see batch/emulated_job.py for the state).

One pacer coroutine hands out calls: it takes the next line, waits for a free slot (at most
emulated_concurrency calls in flight) and for the provider's shared limiter (one request plus the
line's token estimate), then starts the call. Pacing in one place keeps the limiter's Redis
traffic at one script call per request per process instead of every waiting call polling it.
A 429 penalizes the limiter for its Retry-After (every worker backs off) and the line is tried
again; 5xx, timeouts and connection errors are retried with backoff; after
emulated_max_attempts the line gets an error line (the ingest requeues its request). A monitor
refreshes the heartbeat and writes request_counts to the job row; it stops the run when the
heartbeat was taken over or the job is being cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson

from batch.emulated_job import (
    APPEND,
    EXHAUSTED,
    REFRESH,
    RELEASE,
    RUNNING,
    STATE_TTL_S,
    end_job,
    error_line,
    output_line,
    pending_rows,
    state_keys,
    write_counts,
)
from batch.jobs import provider_of
from batch.jsonl import encode_line
from core import keys
from core.db import session_scope
from core.providers import ProviderConfig, async_client_for
from core.ratelimit import AsyncRateLimiter, RateLimits
from core.redis_conn import get_redis, new_async_redis
from core.settings import Settings, get_settings
from models.status import BatchStatus
from models.tables import BatchJob
from rules.backoff import backoff_s
from rules.tokens import count_message_tokens
from streaming.provider_errors import RETRYABLE_STATUS, retry_after_s

log = logging.getLogger("sheepdog.batch.emulator")

BACKOFF_MAX_S = 30.0
NO_STREAM = ("stream", "stream_options")


@dataclass
class EmulateReport:
    """What one executor run did. `outcome`: completed, cancelled, busy (another executor
    holds the job), idle (the job is not running), stopped (lost the heartbeat, job moved)."""

    job_id: str
    outcome: str
    calls: int = 0
    written: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class Line:
    custom_id: str
    body: dict[str, Any]
    tokens: int
    attempt: int = 0


def token_estimate(body: dict[str, Any], default_max_tokens: int) -> int:
    """Tokens a call may use: the prompt's local estimate plus its answer limit."""
    answer = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    return count_message_tokens(body.get("messages") or []) + int(answer)


def backoff(attempt: int, base: float) -> float:
    """The wait before attempt `attempt + 1` of a line (rules/backoff.py, capped here)."""
    return backoff_s(attempt, base, BACKOFF_MAX_S)


def emulate(job_id: str, settings: Settings | None = None) -> EmulateReport:
    """Run an emulated job's remaining lines to the end (or until stopped); idempotent: a second
    executor for the same job returns `busy` at once, a finished job `idle`."""
    settings = settings or get_settings()
    token = secrets.token_hex(8)
    r = get_redis(settings.redis_url)
    heartbeat = keys.of(settings).emulated(job_id, "heartbeat")
    ttl_ms = int(settings.emulated_heartbeat_ttl_s * 1000)
    if not r.set(heartbeat, token, nx=True, px=ttl_ms):
        return EmulateReport(job_id, "busy")
    try:
        with session_scope(settings.database_url) as session:
            job = session.get(BatchJob, job_id)
            if job is None or job.status not in (RUNNING, BatchStatus.CANCELLING):
                return EmulateReport(job_id, "idle")
            status, model, provider_name = job.status, job.model, job.provider
        if status == BatchStatus.CANCELLING:
            end_job(settings, job_id, BatchStatus.CANCELLING, BatchStatus.CANCELLED, {})
            return EmulateReport(job_id, "cancelled")
        provider = provider_of(settings, provider_name, model)
        run = Executor(settings, job_id, provider, token)
        return asyncio.run(run.main())
    finally:
        r.register_script(RELEASE)(keys=[heartbeat], args=[token])


@dataclass(eq=False)
class Executor:
    """One run of one job on a private event loop."""

    settings: Settings
    job_id: str
    provider: ProviderConfig
    token: str
    ready: deque[Line] = field(default_factory=deque)
    outstanding: int = 0  # lines taken from the source and not yet written
    source_done: bool = False
    after_id: str = ""
    stop_reason: str | None = None
    calls: int = 0
    written: int = 0

    async def main(self) -> EmulateReport:
        started = time.monotonic()
        s = self.settings
        self.redis = new_async_redis(s.redis_url)
        self.client = async_client_for(self.provider)
        self.limiter = (
            AsyncRateLimiter(
                self.redis,
                self.provider.name,
                RateLimits(self.provider.requests_per_minute, self.provider.tokens_per_minute),
                keys.of(s),
            )
            if self.provider.rate_limited
            else None
        )
        self.append = self.redis.register_script(APPEND)
        self.refresh = self.redis.register_script(REFRESH)
        self.keys = list(state_keys(keys.of(s), self.job_id))
        self.done = {_text(k) for k in await self.redis.hkeys(self.keys[0])}
        self.wake = asyncio.Event()
        self.slots = asyncio.Semaphore(max(s.emulated_concurrency, 1))
        self.inflight: set[asyncio.Task[None]] = set()
        monitor = asyncio.create_task(self._monitor())
        try:
            await self._pace()
            if self.stop_reason is None:
                await self._progress()  # final counts before the status moves
        finally:
            monitor.cancel()
            for task in list(self.inflight):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(monitor, *self.inflight, return_exceptions=True)
            await self.client.close()
        outcome = self.stop_reason or "completed"
        if outcome in ("completed", "cancelled"):
            counts = await self._counts()
            frm = RUNNING if outcome == "completed" else BatchStatus.CANCELLING
            to = BatchStatus(outcome)  # completed | cancelled
            await asyncio.to_thread(end_job, s, self.job_id, frm, to, counts)
        await self.redis.aclose()
        report = EmulateReport(
            self.job_id, outcome, self.calls, self.written, time.monotonic() - started
        )
        log.info(
            "job %s: emulated run %s: %d calls, %d lines written in %.1fs",
            self.job_id,
            outcome,
            self.calls,
            self.written,
            report.seconds,
        )
        return report

    # -- pacing --------------------------------------------------------------------------------

    async def _pace(self) -> None:
        while self.stop_reason is None:
            if not self.ready and not self.source_done:
                self._take(
                    await asyncio.to_thread(pending_rows, self.settings, self.job_id, self.after_id)
                )
                continue
            if not self.ready:
                if self.source_done and self.outstanding == 0:
                    return
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), 0.5)
                continue
            line = self.ready.popleft()
            await self.slots.acquire()
            try:
                if self.limiter is not None:
                    await self.limiter.reserve(line.tokens)
            except BaseException:
                self.slots.release()
                raise
            if self.stop_reason is not None:
                self.slots.release()
                return
            task = asyncio.create_task(self._call(line))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    def _take(self, rows: list[tuple[str, Any]]) -> None:
        if not rows:
            self.source_done = True
            return
        self.after_id = rows[-1][0]
        default = self.settings.emulated_default_max_tokens
        for request_id, body in rows:
            if request_id in self.done:
                continue
            if not isinstance(body, dict):
                body = {}
            self.ready.append(Line(request_id, body, token_estimate(body, default)))
            self.outstanding += 1

    def _again(self, line: Line) -> None:
        self.ready.append(line)
        self.wake.set()

    # -- one call ------------------------------------------------------------------------------

    async def _call(self, line: Line) -> None:
        try:
            line.attempt += 1
            self.calls += 1
            try:
                encode_line(line.custom_id, line.body, str(line.body.get("model") or ""))
            except ValueError as err:
                await self._write(line, error_line(line.custom_id, "invalid_request", str(err)))
                return
            body = {k: v for k, v in line.body.items() if k not in NO_STREAM}
            try:
                raw = await self.client.chat.completions.with_raw_response.create(
                    model=body.pop("model"), messages=body.pop("messages"), extra_body=body
                )
                answer = orjson.loads(raw.content)
                if not isinstance(answer, dict):  # `[]`, `null`: no answer's shape
                    await self._retry(line, "malformed answer from the provider", None)
                    return
                request_id = raw.headers.get("x-request-id") or answer.get("id")
                await self._write(line, output_line(line.custom_id, 200, request_id, answer))
            except openai.APIStatusError as err:
                status = err.status_code
                if status in RETRYABLE_STATUS or status >= 500:
                    wait = retry_after_s(err.response.headers)
                    if status == 429 and self.limiter is not None:
                        await self.limiter.penalize(wait if wait is not None else 1.0)
                    await self._retry(line, f"provider answered {status}", wait)
                    return
                await self._write(
                    line,
                    output_line(
                        line.custom_id,
                        status,
                        err.response.headers.get("x-request-id"),
                        _error_body(err),
                    ),
                    ok=False,
                )
            except openai.APITimeoutError:
                await self._retry(line, "provider timed out", None)
            except openai.APIConnectionError as err:
                await self._retry(line, f"cannot reach the provider: {err.__cause__ or err}", None)
            except orjson.JSONDecodeError:
                await self._retry(line, "malformed answer from the provider", None)
            except Exception as err:  # anything else: the line is still tried, then ended
                log.exception("job %s: %s: unexpected error", self.job_id, line.custom_id)
                await self._retry(line, f"unexpected error: {err!r}", None)
        finally:
            self.slots.release()

    async def _retry(self, line: Line, reason: str, wait: float | None) -> None:
        if line.attempt >= self.settings.emulated_max_attempts:
            message = f"{reason} (gave up after {line.attempt} attempts)"
            await self._write(line, error_line(line.custom_id, EXHAUSTED, message), ok=False)
            return
        base = self.settings.emulated_backoff_base_s
        delay = wait if wait is not None else backoff(line.attempt, base)
        log.info("job %s: %s: %s; again in %.2fs", self.job_id, line.custom_id, reason, delay)
        asyncio.get_running_loop().call_later(delay, self._again, line)

    async def _write(self, line: Line, data: bytes, ok: bool = True) -> None:
        counter = "completed" if ok else "failed"
        added = await self.append(
            keys=self.keys, args=[line.custom_id, data, counter, STATE_TTL_S * 1000]
        )
        self.written += int(added)
        self.outstanding -= 1
        self.wake.set()

    # -- heartbeat and progress ----------------------------------------------------------------

    async def _monitor(self) -> None:
        s = self.settings
        interval = min(s.emulated_heartbeat_ttl_s / 4, s.emulated_progress_interval_s)
        ttl_ms = int(s.emulated_heartbeat_ttl_s * 1000)
        heartbeat = keys.of(s).emulated(self.job_id, "heartbeat")
        last_progress = time.monotonic()
        while self.stop_reason is None:
            await asyncio.sleep(interval)
            try:
                if not await self.refresh(keys=[heartbeat], args=[self.token, ttl_ms]):
                    self._stop("stopped", "heartbeat taken over by another executor")
                    return
                if time.monotonic() - last_progress >= s.emulated_progress_interval_s:
                    last_progress = time.monotonic()
                    await self._progress()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis or the database away for a moment: try next round
                log.exception("job %s: heartbeat/progress update failed", self.job_id)

    async def _counts(self) -> dict[str, int]:
        raw = await self.redis.hgetall(self.keys[2])
        return {_text(k): int(v) for k, v in raw.items()}

    async def _progress(self) -> None:
        counts = await self._counts()
        status = await asyncio.to_thread(write_counts, self.settings, self.job_id, counts)
        if status == BatchStatus.CANCELLING:
            self._stop("cancelled", "job cancelled")
        elif status != RUNNING:
            self._stop("stopped", f"job is {status}")

    def _stop(self, outcome: str, why: str) -> None:
        if self.stop_reason is None:
            log.warning("job %s: stopping the emulated run: %s", self.job_id, why)
            self.stop_reason = outcome
            self.wake.set()
            for task in list(self.inflight):
                task.cancel()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _error_body(err: openai.APIStatusError) -> Any:
    try:
        body = orjson.loads(err.response.content)
    except (orjson.JSONDecodeError, ValueError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body
    return {"error": {"code": f"http_{err.status_code}", "message": str(err.message)}}
