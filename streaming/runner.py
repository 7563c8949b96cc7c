"""`run_stream`: what the stream engine does for one `sheepdog.stream` task.

Order of work, chosen for time to first token: check the cancel flag (one Redis EXISTS), start
the provider call on the loop, and meanwhile record + claim the row through the process's
batching database writer (streaming/writer.py); the first token is published as soon as both
are done. The row's end goes through the writer too, and is written
before the last message is published, so a subscriber that sees `done` can read the finished
row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError

from core.settings import Settings
from lifecycle.record import release_keys
from models.intake_message import IntakeItem, Lane
from models.status import Status
from models.stream_message import StreamMessage, encode
from streaming import store
from streaming.end import End, StreamResult
from streaming.job import CANCELLED, LOST, Grant, StreamJob
from streaming.lanes import LaneRun, parse_deadline
from streaming.out_of_band import publish_error
from streaming.publisher import fence_token, next_seq
from streaming.runtime import Runtime

log = logging.getLogger("sheepdog.streaming")

CANCELLED_FIRST = "cancelled before the start"
UNWRITTEN = "end not written"

T = TypeVar("T")


async def run_stream(
    runtime: Runtime,
    request_id: str,
    item: dict[str, Any] | None = None,
    *,
    overlap: bool = True,
    started: float | None = None,
) -> str:
    """Stream one request end to end on the engine's loop; returns how it ended (for logs and
    tests).

    With `overlap` the provider call starts while the row is recorded and claimed; without it
    (a redelivered message) the row is checked first. `started`: when the task began (trace)."""
    started = started or time.time()
    settings = runtime.settings
    intake: IntakeItem | None = None
    taken_back = False  # the janitor took the row back: an earlier worker may have billed text
    if item is not None:
        try:
            intake = IntakeItem.model_validate(item)
        except ValidationError as err:
            log.error(
                "%s: malformed stream message dropped (%d errors)", request_id, err.error_count()
            )
            return "malformed"
    if intake is not None:
        body = intake.body
        deadline = parse_deadline(intake.request.get("deadline"))
        lanes = LaneRun(settings, _stream_lane(intake.lane_or_route), deadline)
    else:
        row = await runtime.writer.on_end_thread(store.load, settings.database_url, request_id)
        if row is None:
            log.error("%s: no such request", request_id)
            return "missing"
        if row.status != Status.QUEUED.value:
            return f"skipped ({row.status})"
        body, taken_back = row.body, row.attempts > 0
        lanes = LaneRun(settings, _stream_lane(row.lane), parse_deadline(row.deadline))
    if not overlap and intake is not None:
        # A redelivered message most likely names a request that already ran: claim first
        # rather than pay for a provider call that would be thrown away.
        state = await runtime.writer.on_end_thread(store.load, settings.database_url, request_id)
        if state is not None and state.status != Status.QUEUED.value:
            return f"skipped ({state.status})"
        taken_back = state is not None and state.attempts > 0
    job = runtime.register(request_id, body)
    job.lanes = lanes
    # The first call of a row taken back waits for the claim, which says what the earlier
    # worker sent, to fit it to the request's cost cap (streaming/call_limits.py).
    job.takeover = taken_back
    if runtime.trace:
        job.marks = {"task": started}
        job.arrivals = []
    try:
        ended = await serve(runtime, job, settings, intake)
    finally:
        runtime.forget(job)
    if ended is CANCELLED_FIRST:
        return await runtime.writer.on_end_thread(
            _cancel_before_start, settings, request_id, intake
        )
    return ended


def _stream_lane(lane: str | None) -> Lane:
    """A stream-path row's lane (a row from before lanes, or a batch row escalated: stream)."""
    return lane if lane in ("priority", "flex") else "stream"  # type: ignore[return-value]


async def serve(
    runtime: Runtime, job: StreamJob, settings: Settings, intake: IntakeItem | None
) -> str:
    """Claim, stream and end one request (on the loop); returns how it ended, or
    CANCELLED_FIRST for a request cancelled before it started (left to the caller)."""
    if job.marks is not None:
        job.marks["loop"] = time.time()
    if await runtime.lookups.cancelled(job.request_id):
        return CANCELLED_FIRST
    claimed = runtime.writer.claim(job.request_id, intake)
    streaming = asyncio.ensure_future(job.run())  # the provider call overlaps the claim
    try:
        claim = await _bounded(runtime, claimed, "claim")
        if job.marks is not None:
            job.marks["claimed"] = time.time()
    except BaseException as err:
        job.stop(LOST)
        job.resolve(None)
        await asyncio.wait([streaming])
        if isinstance(err, store.Unstorable):  # recorded failed alone, with its reason
            return await _unstorable(runtime, job, intake, err)
        if isinstance(err, Exception) and store.is_transient(err):
            # The task sends itself again later (tasks/stream.py): the message may be the
            # request's only copy. A claim that did commit unseen is the janitor's (no heartbeat).
            raise store.Unavailable(f"claim failed: {err!r}") from err
        raise
    if claim is None:
        job.stop(LOST)
        job.resolve(None)
        await asyncio.wait([streaming])
        return "skipped (not queued)"
    if job.previous is not None:  # an older job for this id lost its row: stop its stream
        job.previous.stop(LOST)
    # Owning the row is a state change (the attempt under way may count for longer already).
    job.live_until = max(job.live_until, time.monotonic() + runtime.settings.heartbeat_timeout_s)
    await _grant(runtime, job, claim)
    try:
        outcome: StreamResult = await streaming
    except Exception as err:  # a bug must not leave the row streaming until the janitor
        log.exception("%s: stream crashed", job.request_id)
        crashed = End(Status.FAILED, "".join(job.parts), error=f"internal error: {err}")
        outcome = StreamResult(crashed, job.calls)
    return await _finish(runtime, job, claim, outcome)


async def _unstorable(
    runtime: Runtime, job: StreamJob, intake: IntakeItem | None, err: store.Unstorable
) -> str:
    log.error("%s: %s", job.request_id, err.reason)
    if intake is not None and not err.keyed:
        await asyncio.to_thread(release_keys, runtime.settings, [intake])
    payload = encode(job.request_id, 0, "error", error=err.reason)
    await runtime.publisher.send(job.request_id, payload, fence_token(0))
    return Status.FAILED.value


async def _bounded(runtime: Runtime, pending: asyncio.Future[T], what: str) -> T:
    """Await a writer future for at most the writer's own bound: the writer resolves every
    future, and this keeps a stream from waiting forever should that ever fail."""
    try:
        return await asyncio.wait_for(asyncio.shield(pending), runtime.writer.max_wait_s)
    except TimeoutError:
        raise store.Unavailable(f"{what} not resolved in {runtime.writer.max_wait_s:g}s") from None


async def _written_unseen(runtime: Runtime, job: StreamJob, claim: store.Claim, end: End) -> bool:
    """A fenced end may be this end itself, committed while the database went away (the
    batch was then sent again); checked only on that rare path."""
    try:
        return await runtime.writer.on_end_thread(
            store.ended_as, runtime.settings.database_url, job.request_id, claim, end
        )
    except Exception:  # the janitor's view of the row wins
        return False


async def _grant(runtime: Runtime, job: StreamJob, claim: store.Claim) -> None:
    grant: Grant | None = None
    try:
        # Checked again now the job is registered: a cancel published before registration
        # was missed by the listener, but its flag was set before it was published. A row
        # made by this claim has no replay log yet.
        if claim.fresh:
            cancelled, logged = await runtime.lookups.cancelled(job.request_id), None
        else:
            cancelled, logged = await runtime.lookups.cancelled_and_log(job.request_id)
        if cancelled:
            job.stop(CANCELLED)
        last = StreamMessage.parse(logged.last) if logged else None
        grant = Grant(
            claim.attempts,
            next_seq(last),
            last is not None and last.type == "token",
            sent_calls=logged.runs if logged else 0,
            sent_pieces=logged.tokens if logged else 0,
        )
    finally:
        job.resolve(grant)


async def _finish(
    runtime: Runtime, job: StreamJob, claim: store.Claim, outcome: StreamResult
) -> str:
    end = outcome.end
    if end is None:
        log.warning("%s: lost the row to another worker; left to it", job.request_id)
        return LOST
    # Waiting on the database is not progress: from here the heartbeat refreshes the row no
    # more, so an end stuck past heartbeat_timeout_s lets the janitor take the row back.
    job.live_until = 0.0
    try:
        cost = await _bounded(runtime, runtime.writer.finish(job.request_id, claim, end), "end")
    except store.Fenced:
        if not await _written_unseen(runtime, job, claim, end):
            log.warning(
                "%s: row taken back before the end was written; left to its owner",
                job.request_id,
            )
            return LOST
        cost = None  # in the row; the last message goes out without it
    except Exception as err:
        # Left `streaming` without a heartbeat: the janitor takes it back and sends it again.
        log.error("%s: end not written (%r); left to the janitor", job.request_id, err)
        return UNWRITTEN
    # The row's end is written first, so a subscriber that sees `done` can read the finished row.
    job.adopt_grant()
    if end.status is Status.SUCCEEDED:
        usage = {
            "prompt_tokens": end.prompt_tokens,
            "completion_tokens": end.completion_tokens,
            "estimated": end.usage_estimated,
        }
        await job.final(
            "done",
            usage=usage,
            cost_usd=str(cost) if cost is not None else None,
            finish_reason=end.finish_reason,
        )
    else:
        await job.final("error", error=end.error)
    log.info(
        "%s: %s after %d provider call(s)", job.request_id, end.status.value, outcome.provider_calls
    )
    if job.marks is not None:  # a diagnostic for bench/bench_stream.py; never on by default
        key = runtime.names.stream_trace(job.request_id)
        trace = {**job.marks, "arrivals": orjson.dumps(job.arrivals)}
        async with runtime.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=trace)  # type: ignore[arg-type]
            pipe.expire(key, 3600)
            await pipe.execute()
    return end.status.value


def _cancel_before_start(settings: Settings, request_id: str, intake: IntakeItem | None) -> str:
    """A cancelled request never starts: record it (if new) and end it `cancelled`."""
    attempts = store.cancel_queued(settings.database_url, request_id, intake)
    if attempts is None:
        row = store.load(settings.database_url, request_id)
        return f"skipped ({row.status if row else 'missing'})"
    publish_error(settings, request_id, "cancelled", attempts=attempts)
    return Status.CANCELLED.value
