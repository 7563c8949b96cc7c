"""One streaming request inside a worker's event loop: attempts, retries, resets, cost cap.

The job starts calling the provider at once; its first token waits for the *grant* (the claim
of the row by the process's writer plus the replay log's next seq), so the database work
overlaps the provider's time to first token instead of adding to it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from models.status import Status
from models.stream_message import encode
from models.tables import storable, utcnow
from rules.backoff import backoff_s
from rules.tokens import count_message_tokens, count_tokens
from rules.usage import reported_usage
from streaming.billing import Billed
from streaming.call_limits import CallBound, pieces_limit
from streaming.end import End, StreamResult
from streaming.job_services import JobServices
from streaming.lanes import TIER_ASKED, LaneRun
from streaming.provider_errors import Fatal, RejectsStreamOptions, Retryable
from streaming.provider_stream import AttemptEnd, stream_once
from streaming.publisher import fence_token

log = logging.getLogger("sheepdog.streaming")

CANCELLED: Final = Status.CANCELLED
LOST: Final = "lost"  # the row was taken back by the janitor, or the claim failed

StopReason = Literal[Status.CANCELLED, "lost"]


class LogLost(Exception):
    """Raised in a chunk's handler when Redis lost the stream's replay log."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What the job is handed once its runner owns the row."""

    attempts: int
    next_seq: int
    reset_first: bool
    # Billed text of earlier attempts (killed, or fenced: no end written) in the log.
    sent_calls: int = 0
    sent_pieces: int = 0


@dataclass(eq=False)
class StreamJob:
    """A request being streamed by this process."""

    services: JobServices  # the runtime's
    request_id: str
    body: dict[str, Any]
    grant_future: asyncio.Future[Grant | None]
    task: asyncio.Task[StreamResult] | None = None
    stop_reason: StopReason | None = None
    grant: Grant | None = None
    seq: int = 0
    parts: list[str] = field(default_factory=list)
    shown: int = 0  # tokens published since the last reset
    tokens: int = 0
    billed: Billed = field(default_factory=Billed)  # text no answer's usage pays for
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
    served_tier: str | None = None  # the last attempt's, as its chunks name it
    previous: StreamJob | None = None  # a job for the same id this one replaced in the runtime
    finished: bool = False
    restarts: int = 0  # answers started again in a new replay log (Redis lost the old one)
    relog: bool = False  # set when Redis lost the log: the next chunk restarts the answer
    lanes: LaneRun | None = None  # the lane (service tier, flex fallback); None: standard
    takeover: bool = False  # a row the janitor took back: an earlier worker may have billed
    bound: CallBound = field(default_factory=CallBound)  # the cost cap's or hold's on a call

    def live_for(self, seconds: float) -> None:
        """Count the job as making progress for `seconds` from now (a state change)."""
        self.live_until = time.monotonic() + seconds

    # -- control (on the loop) ------------------------------------------------------------

    def stop(self, reason: StopReason) -> None:
        """Abort the stream (cancel request or lost ownership); its HTTP response is closed."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def resolve(self, grant: Grant | None) -> None:
        """Hand the job its grant (or None: it does not own the row and must stop quietly),
        with the text earlier attempts sent, counted as billed before the job's end is made."""
        if not self.grant_future.done():
            if grant is not None:
                self.billed.calls += grant.sent_calls
                self.billed.pieces += grant.sent_pieces
            self.grant_future.set_result(grant)

    # -- publishing --------------------------------------------------------------------------

    # Every message carries a fencing token made of the attempt that owns the row (the grant's)
    # and this job's restarts: Redis refuses the messages of an attempt the janitor superseded,
    # as the row refuses its writes (streaming/deliver.lua). `seq` counts what this job sent;
    # the fence numbers what goes out.

    @property
    def token(self) -> int:
        return fence_token(self.grant.attempts if self.grant else 0, self.restarts)

    def log_lost(self) -> None:
        """Redis lost this stream's replay log: the answer starts again (at the next chunk) in
        a new log, from seq 0 and under a new token that fences off what is still in flight."""
        if not self.relog:
            log.warning(
                "%s: replay log lost (Redis lost its data); starting again", self.request_id
            )
        self.relog = True

    def _put(self, type_: Any, **fields: Any) -> None:
        assert self.grant is not None  # only a job that owns the row publishes
        payload = encode(self.request_id, self.seq, type_, **fields)
        self.services.publisher.put(self.request_id, payload, self.token)
        self.seq += 1

    async def final(self, type_: Any, **fields: Any) -> None:
        """Publish the last message and wait until Redis has it (the same script call leaves
        the log only the short done TTL: the row holds the answer)."""
        assert self.grant is not None
        payload = encode(self.request_id, self.seq, type_, **fields)
        self.seq += 1
        await self.services.publisher.send(self.request_id, payload, self.token)

    def _reset(self) -> None:
        if self.shown:
            self._put("reset")
        self.shown = 0
        self._drop_answer()

    def _drop_answer(self) -> None:
        """Let go of this attempt's text; its pieces stay counted as billed."""
        self.billed.pieces += self.tokens
        self.parts.clear()
        self.tokens = 0

    async def _wait_grant(self) -> Grant:
        # Shielded: a stop while waiting must not cancel the future, which the claim resolves
        # all the same (the end goes out under its grant: adopt_grant).
        grant = await asyncio.shield(self.grant_future)
        if grant is None:
            self.stop_reason = LOST
            raise asyncio.CancelledError
        if self.grant is None:
            self.grant = grant
            self.seq = grant.next_seq
            if grant.reset_first:
                self._put("reset")
        return grant

    def adopt_grant(self) -> None:
        """Take the grant resolved after the job was stopped before it awaited it (a cancel
        found at the claim, or heard while the claim was under way): its end goes out under
        it."""
        future = self.grant_future
        if self.grant is None and future.done() and not future.cancelled():
            grant = future.result()
            if grant is not None:
                self.grant, self.seq = grant, grant.next_seq

    async def _before_body(self) -> None:
        """The answer streams: wait for the grant (the claim of the row) before its text."""
        if self.grant is None:
            await self._wait_grant()

    def _on_tier(self, tier: str) -> None:
        self.served_tier = tier

    def _on_text(self, text: str) -> bool:
        """One piece of the answer, on the loop (in the provider connection's callback)."""
        if self.stop_reason is not None:
            return False  # stopped (cancel, lost row): its task ends the call, nothing more out
        if self.relog:
            raise LogLost
        if self.first_token_at is None:
            self.first_token_at = utcnow()
            if self.marks is not None:
                self.marks.setdefault("text", time.time())
                self.marks["put"] = time.time()
        if self.arrivals is not None:
            self.arrivals.append(time.time())
        text = storable(text)  # what is published is what the row will hold
        self.parts.append(text)
        if not self.tokens:
            self.billed.calls += 1  # a call that answered is billed its prompt
        self.tokens += 1
        self.shown += 1
        self._put("token", text=text)
        limit = self.bound.limit or self.max_tokens
        return limit is None or self.tokens < limit

    @functools.cached_property
    def prompt_estimate(self) -> int:
        """The prompt's local token count (for what no usage reports), counted once."""
        return count_message_tokens(self.body.get("messages") or [])

    @functools.cached_property
    def max_tokens(self) -> int | None:
        """The answer's limit in pieces (streaming/call_limits.py)."""
        return pieces_limit(self.body)

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> StreamResult:
        """Stream with retries; always returns a StreamResult (after the grant has arrived)."""
        self.task = asyncio.current_task()  # type: ignore[assignment]
        try:
            if self.stop_reason is not None:
                raise asyncio.CancelledError
            return await self._attempts()  # every end waits for the grant
        except asyncio.CancelledError:
            if self.stop_reason is None:
                raise  # the loop is shutting down
            return self._cut_short(self.stop_reason)

    async def _attempts(self) -> StreamResult:
        settings = self.services.settings
        lanes = self.lanes or LaneRun(settings)
        include_usage = True
        attempt = 0
        while True:
            attempt += 1
            self.calls += 1
            if lanes.flex and lanes.at_risk():
                lanes.fall_back("too close to the deadline for flex")
            # The provider has the lane's timeout to start answering (a busy one is slow, not
            # stalled; flex the SDK's long one); stream_once watches the idle limit itself.
            timeout_s = lanes.timeout_s()
            # An attempt in flight counts as progress within its own timeouts (connect and
            # first byte, then the idle limit to its first text; the heartbeat sees the texts).
            in_flight_s = timeout_s + settings.stream_idle_timeout_s
            self.live_for(in_flight_s)
            if (spent := await self._bound_call(lanes)) is not None:
                return await self._failed(spent)
            try:
                endpoint = await self.services.providers.before_call(self.body)  # rate limit
                self.live_for(in_flight_s)
                end = await stream_once(
                    endpoint,
                    lanes.body(self.bound.body(self.body)),
                    include_usage=include_usage,
                    timeout_s=timeout_s,
                    idle_timeout_s=settings.stream_idle_timeout_s,
                    answer_max_s=settings.stream_answer_max_s,
                    on_text=self._on_text,
                    on_tier=self._on_tier,
                    before_body=self._before_body,
                )
            except LogLost:
                attempt -= 1  # not the provider's fault: a free retry, at once
                self._restart_log()
                continue
            except RejectsStreamOptions as err:
                if not include_usage:
                    return await self._failed(err.reason)
                log.info(
                    "%s: provider rejects stream_options; usage counted locally", self.request_id
                )
                include_usage = False
                attempt -= 1  # not the provider's fault: a free retry
                self._grant_then_reset()
                continue
            except Fatal as err:
                return await self._failed(err.reason)
            except Retryable as err:
                if lanes.flex and err.status == 429:
                    # Flex capacity, not a fault: not one of the attempts, nor the shared
                    # limiter's business; tried again while the deadline allows.
                    attempt -= 1
                    self._grant_then_reset()
                    wait = lanes.after_flex_429(err.retry_after)
                    if wait is not None:
                        self.live_for(wait + in_flight_s)
                        await asyncio.sleep(wait)
                    continue
                await self.services.providers.after_retryable(self.body, err)
                if attempt >= settings.stream_max_attempts:
                    return await self._failed(f"{err.reason} (gave up after {attempt} attempts)")
                delay = err.retry_after
                if delay is None:  # the provider named no wait
                    delay = backoff_s(
                        attempt, settings.stream_backoff_base_s, settings.stream_backoff_max_s
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
            return self._succeeded(end, lanes)

    async def _bound_call(self, lanes: LaneRun) -> str | None:
        """Fit the next call to what the request's cost cap or budget hold has left after the
        text earlier calls billed; the failure's reason when nothing is."""
        if self.grant is None and (self.takeover or self.billed.calls):
            await self._before_body()  # the grant brings what earlier workers sent
        read = functools.partial(self.services.spend_limit, self.request_id)
        return await self.bound.fit(
            read, self.billed, lambda: self.prompt_estimate, self.body, lanes.lane
        )

    def _restart_log(self) -> None:
        # A new log needs no reset: nothing of it was shown. The new token fences off the old
        # log's messages still queued.
        self.relog = False
        self.restarts += 1
        self.seq = 0
        self.shown = 0
        self._drop_answer()

    def _grant_then_reset(self) -> None:
        # Only granted jobs have published anything; an ungranted one has nothing to take back.
        if self.grant is not None:
            self._reset()
        else:
            self._drop_answer()

    def _cut_short(
        self, kind: StopReason | Literal[Status.FAILED], reason: str | None = None
    ) -> StreamResult:
        """The result of a stream cancelled, failed or lost; when any call streamed text, with
        what the provider billed for it, estimated (a cut answer has no usage): each such
        call's prompt, and every piece streamed."""
        if kind == LOST:
            return StreamResult(None, self.calls)
        usage = self.billed.cut(self.prompt_estimate, self.tokens, "".join(self.parts))
        if usage:  # at the tier its chunks named, else the one its lane asked for
            asked = TIER_ASKED.get(self.lanes.lane) if self.lanes else None
            usage["service_tier"] = self.served_tier or asked
        if kind == CANCELLED:
            return self._result(Status.CANCELLED, error="cancelled", **usage)
        lane = self.lanes.left_lane() if self.lanes is not None else {}
        return self._result(Status.FAILED, error=reason or "failed", **usage, **lane)

    def _succeeded(self, answer: AttemptEnd, lanes: LaneRun) -> StreamResult:
        text = "".join(self.parts)
        usage = answer.usage
        reported = reported_usage(usage) if usage is not None else None
        if usage is not None and reported is None:
            log.warning(
                "%s: the provider's usage is not token counts (%.200r); counted locally",
                self.request_id,
                usage,
            )
        if reported is not None:
            (prompt, completion), estimated = reported, False
        else:
            prompt, estimated = self.prompt_estimate, True
            completion = max(self.tokens, count_tokens(text))
        taken_back = self.billed.before(lambda: self.prompt_estimate, answered=self.tokens > 0)
        if (left := lanes.seconds_left()) is not None and left < 0:  # started in time: not cut
            log.warning("%s: finished %.0fs after its deadline", self.request_id, -left)
        return self._result(
            Status.SUCCEEDED,
            finish_reason=answer.finish_reason,
            prompt_tokens=prompt,
            completion_tokens=completion,
            usage_estimated=estimated,
            service_tier=answer.service_tier,
            taken_back=taken_back,
            **lanes.left_lane(),
        )

    async def _failed(self, reason: str) -> StreamResult:
        # After the grant, as every end: it may bring earlier attempts' text to charge.
        await self._before_body()
        return self._cut_short(Status.FAILED, reason)

    def _result(self, status: Status, **fields: Any) -> StreamResult:
        end = End(status, "".join(self.parts), first_token_at=self.first_token_at, **fields)
        return StreamResult(end, self.calls)
