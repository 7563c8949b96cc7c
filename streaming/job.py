"""One streaming request inside a worker's event loop: attempts, retries, resets, cost cap.

The job starts calling the provider at once; its first token waits for the *grant* (the claim
of the row by the process's writer plus the replay log's next seq), so the database work
overlaps the provider's time to first token instead of adding to it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx2

from models.stream_message import encode
from models.tables import utcnow
from sheepdog.settings import Settings
from sheepdog.tokens import count_message_tokens, count_tokens
from streaming import providers
from streaming.provider_stream import Fatal, RejectsStreamOptions, Retryable, stream_once

if TYPE_CHECKING:
    from streaming.runtime import Runtime

log = logging.getLogger("sheepdog.streaming")

CANCELLED = "cancelled"
LOST = "lost"  # the row was taken back by the janitor, or the claim failed


@dataclass(frozen=True, slots=True)
class Grant:
    """What the task thread hands the job once it owns the row."""

    attempts: int
    next_seq: int
    reset_first: bool


@dataclass(slots=True)
class Outcome:
    """How the job ended (the task thread writes it to the row)."""

    kind: str  # "succeeded" | "failed" | CANCELLED | LOST
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_estimated: bool = False
    error: str | None = None
    first_token_at: datetime | None = None
    provider_calls: int = 0


def backoff_s(attempt: int, settings: Settings) -> float:
    """Exponential backoff with full jitter (attempt counts from 1)."""
    cap = min(settings.stream_backoff_max_s, settings.stream_backoff_base_s * 2 ** (attempt - 1))
    return random.uniform(cap / 2, cap)


@dataclass(eq=False)
class StreamJob:
    """A request being streamed by this process."""

    runtime: Runtime
    request_id: str
    body: dict[str, Any]
    grant_future: asyncio.Future[Grant | None]
    task: asyncio.Task[Outcome] | None = None
    stop_reason: str | None = None
    grant: Grant | None = None
    seq: int = 0
    parts: list[str] = field(default_factory=list)
    shown: int = 0  # tokens published since the last reset
    tokens: int = 0
    first_token_at: datetime | None = None
    calls: int = 0
    marks: dict[str, float] | None = None  # wall-clock stage times (SHEEPDOG_STREAM_TRACE)
    arrivals: list[float] | None = None  # and each token's arrival from the provider
    # Liveness for the heartbeat (monotonic clock): the row is refreshed only while the job
    # makes progress. Set at state changes (grant, each attempt, backoff, the end) and pushed
    # on by the heartbeat itself when `seq` moved since its last round, so a chunk costs nothing.
    live_until: float = 0.0
    beat_seq: int = -1
    stalled: bool = False  # logged once when the heartbeat stops refreshing the row
    previous: StreamJob | None = None  # a job for the same id this one replaced in the runtime
    finished: bool = False

    def live_for(self, seconds: float) -> None:
        """Count the job as making progress for `seconds` from now (a state change)."""
        self.live_until = time.monotonic() + seconds

    # -- control (loop thread) -----------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Abort the stream (cancel request or lost ownership); its HTTP response is closed."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def resolve(self, grant: Grant | None) -> None:
        """Hand the job its grant (or None: it does not own the row and must stop quietly)."""
        if not self.grant_future.done():
            self.grant_future.set_result(grant)

    # -- publishing --------------------------------------------------------------------------

    def _put(self, type_: Any, **fields: Any) -> None:
        self.runtime.publisher.put(
            self.request_id, encode(self.request_id, self.seq, type_, **fields)
        )
        self.seq += 1

    async def final(self, type_: Any, **fields: Any) -> None:
        """Publish the last message and wait until Redis has it."""
        payload = encode(self.request_id, self.seq, type_, **fields)
        self.seq += 1
        await self.runtime.publisher.send(self.request_id, payload)
        await self.runtime.publisher.shorten(self.request_id)

    def _reset(self) -> None:
        if self.shown:
            self._put("reset")
        self.shown = 0
        self.parts.clear()
        self.tokens = 0

    async def _wait_grant(self) -> Grant:
        grant = await self.grant_future
        if grant is None:
            self.stop_reason = LOST
            raise asyncio.CancelledError
        if self.grant is None:
            self.grant = grant
            self.seq = grant.next_seq
            if grant.reset_first:
                self._put("reset")
        return grant

    async def _on_text(self, text: str) -> bool:
        if self.grant is None:
            if self.marks is not None:
                self.marks.setdefault("text", time.time())
            await self._wait_grant()
        if self.first_token_at is None:
            self.first_token_at = utcnow()
            if self.marks is not None:
                self.marks["put"] = time.time()
        if self.arrivals is not None:
            self.arrivals.append(time.time())
        self.parts.append(text)
        self.tokens += 1
        self.shown += 1
        self._put("token", text=text)
        limit = self.max_tokens
        return limit is None or self.tokens < limit

    @property
    def max_tokens(self) -> int | None:
        value = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        return int(value) if value else None

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> Outcome:
        """Stream with retries; always returns an Outcome (after the grant has arrived)."""
        self.task = asyncio.current_task()  # type: ignore[assignment]
        try:
            if self.stop_reason is not None:
                raise asyncio.CancelledError
            outcome = await self._attempts()
            if self.grant is None:
                await self._wait_grant()
            return outcome
        except asyncio.CancelledError:
            if self.stop_reason is None:
                raise  # the loop is shutting down
            return Outcome(self.stop_reason, "".join(self.parts), provider_calls=self.calls)

    async def _attempts(self) -> Outcome:
        settings = self.runtime.settings
        timeout = httpx2.Timeout(settings.provider_timeout_s, read=settings.stream_idle_timeout_s)
        include_usage = True
        attempt = 0
        # An attempt in flight counts as progress within its own timeouts (connect and first
        # byte, then the idle limit between chunks; the heartbeat sees the chunks themselves).
        in_flight_s = settings.provider_timeout_s + settings.stream_idle_timeout_s
        while True:
            attempt += 1
            self.calls += 1
            self.live_for(in_flight_s)
            try:
                client = await providers.before_call(self.runtime, self.body)  # rate limit
                self.live_for(in_flight_s)
                end = await stream_once(
                    client,
                    self.body,
                    include_usage=include_usage,
                    timeout=timeout,
                    idle_timeout_s=settings.stream_idle_timeout_s,
                    on_text=self._on_text,
                )
            except RejectsStreamOptions as err:
                if not include_usage:
                    return self._failed(err.reason)
                log.info(
                    "%s: provider rejects stream_options; usage counted locally", self.request_id
                )
                include_usage = False
                attempt -= 1  # not the provider's fault: a free retry
                self._grant_then_reset()
                continue
            except Fatal as err:
                return self._failed(err.reason)
            except Retryable as err:
                await providers.after_retryable(self.runtime, self.body, err)
                if attempt >= settings.stream_max_attempts:
                    return self._failed(f"{err.reason} (gave up after {attempt} attempts)")
                delay = (
                    err.retry_after if err.retry_after is not None else backoff_s(attempt, settings)
                )
                log.warning(
                    "%s: attempt %d failed (%s); retrying in %.2fs",
                    self.request_id,
                    attempt,
                    err.reason,
                    delay,
                )
                self._grant_then_reset()
                self.live_for(delay + in_flight_s)
                await asyncio.sleep(delay)
                continue
            return self._succeeded(end.finish_reason, end.usage)

    def _grant_then_reset(self) -> None:
        # Only granted jobs have published anything; an ungranted one has nothing to take back.
        if self.grant is not None:
            self._reset()
        else:
            self.parts.clear()
            self.tokens = 0

    def _succeeded(self, finish_reason: str, usage: dict[str, Any] | None) -> Outcome:
        text = "".join(self.parts)
        if usage is not None:
            prompt, completion, estimated = (
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
                False,
            )
        else:
            prompt = count_message_tokens(self.body.get("messages") or [])
            completion, estimated = max(self.tokens, count_tokens(text)), True
        return Outcome(
            "succeeded",
            text,
            finish_reason=finish_reason,
            prompt_tokens=prompt,
            completion_tokens=completion,
            usage_estimated=estimated,
            first_token_at=self.first_token_at,
            provider_calls=self.calls,
        )

    def _failed(self, reason: str) -> Outcome:
        return Outcome(
            "failed",
            "".join(self.parts),
            error=reason,
            first_token_at=self.first_token_at,
            provider_calls=self.calls,
        )
