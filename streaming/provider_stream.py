"""One streamed call to the provider, parsed cheaply.

The request is the SDK's (streaming/provider_calls.py takes the URL and headers, its auth
included, from the provider's SDK client) sent through the engine loop's own connections
(streaming/provider_http.py) directly: the SDK's own request path (options, auth flow, httpx2)
costs ~0.4 ms of CPU a call, which a burst of 1,000 streams pays on the engine's one core, and
each chunk would wake the stream's task through several async iterators. The SSE lines are
split from the bytes as they arrive, in the connection's callback, and decoded with orjson, a
few microseconds a chunk instead of a pydantic model per chunk. Errors are sorted into
`Retryable` and `Fatal` (streaming/provider_errors.py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from core.errors import scrub_secrets
from models.tables import bounded
from streaming.provider_errors import (
    Fatal,
    Retryable,
    status_error,
    stream_error,
)
from streaming.provider_http import ProviderHttp, Unsendable
from streaming.provider_response import ResponseCut

ERROR_BODY_LIMIT = 64 * 1024  # of an error answer, read for its message


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a provider's streams go: its chat-completions URL's connections and the request
    headers (its SDK client's, auth included)."""

    http: ProviderHttp
    headers: dict[str, str]


@dataclass(slots=True)
class AttemptEnd:
    """How an attempt ended without error (`finish_reason` None: the provider named none;
    `service_tier` None: nor the tier that served it)."""

    finish_reason: str | None
    usage: dict[str, Any] | None
    service_tier: str | None = None


OnText = Callable[[str], bool]
"""Called on the loop with each piece of text; returns False to stop the stream (cost cap)."""
BeforeBody = Callable[[], Awaitable[None]]


class _TextWatch:
    """Watches the answer's text: the first must come within `first_s` of the call and each
    next within `limit_s` of the one before, else the current task is cancelled (a stall,
    retried); an answer still streaming `end_s` after its first text is ended there, as one
    cut at its token limit is (`cap`). Keep-alive comments and chunks without text are not
    text: a relay that keeps the connection open and sends nothing else holds a stream no
    longer than one that sends nothing. Nothing fires while `busy` (the job's grant is
    awaited: the row's claim is not the provider's time). One timer a stream, re-armed when
    it fires and at the first text: a read with text costs one clock read."""

    def __init__(self, limit_s: float, first_s: float, end_s: float, called_at: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.limit_s, self.first_s, self.end_s = limit_s, first_s, end_s
        self.first_by = called_at + first_s
        self.end_by = math.inf  # set at the first text
        self.last: float | None = None  # the last text's arrival
        self.busy = False
        self.cap: Callable[[], None] | None = None  # ends the answer (the reader's)
        self.fired: Exception | None = None  # why it cancelled the task
        self.handle = self.loop.call_at(self._due(), self._check)

    def texted(self) -> None:
        self.last = self.loop.time()
        if self.end_by == math.inf:  # the first text: the gap's limit and the answer's start
            self.end_by = self.last + self.end_s
            self.handle.cancel()
            self.handle = self.loop.call_at(self._due(), self._check)

    def done_waiting(self) -> None:
        """The grant came: the first text's limit starts again."""
        self.busy = False
        self.first_by = max(self.first_by, self.loop.time() + self.limit_s)

    def _due(self) -> float:
        due = self.first_by if self.last is None else self.last + self.limit_s
        return min(due, self.end_by)

    def _check(self) -> None:
        now = self.loop.time()
        if self.busy:
            self.handle = self.loop.call_at(now + self.limit_s, self._check)
        elif now >= self.end_by and self.cap is not None:
            self.cap()
        elif now < self._due():
            self.handle = self.loop.call_at(self._due(), self._check)
        elif self.task is not None:
            self.fired = (
                Retryable(f"no text for {self.first_s:g}s after the call")
                if self.last is None
                else Retryable(f"stream stalled: no text for {self.limit_s:g}s")
            )
            self.task.cancel()

    def close(self) -> None:
        self.handle.cancel()

    def why(self) -> Exception | None:
        """After a CancelledError: this watch's reason when the cancel was its own (taken
        back), None when someone else cancelled the task too (let it through)."""
        if self.fired is None or self.task is None:
            return None
        self.task.uncancel()
        return self.fired if self.task.cancelling() == 0 else None


async def stream_once(
    endpoint: Endpoint,
    body: dict[str, Any],
    *,
    include_usage: bool,
    timeout_s: float,
    idle_timeout_s: float,
    answer_max_s: float,
    on_text: OnText,
    before_body: BeforeBody | None = None,
    on_tier: Callable[[str], None] | None = None,
) -> AttemptEnd:
    """Stream one answer; raise Retryable or Fatal on failure.

    `timeout_s` bounds the call up to the response's head (a busy provider may take a while to
    start answering: that is not a stall), and the first text must come within `idle_timeout_s`
    more; from then on no text for `idle_timeout_s` is a stall (retried), and an answer still
    streaming `answer_max_s` after its first text ends there (`length`). `before_body` is
    awaited once the head says the answer streams, before any of it is handed to `on_text`
    (the job's grant); what arrives meanwhile waits in the response."""
    kwargs: dict[str, Any] = {**body, "stream": True}
    if include_usage:
        kwargs["stream_options"] = {"include_usage": True}
    called_at = asyncio.get_running_loop().time()
    watch: _TextWatch | None = None
    response = None
    reader: _SseReader | None = None
    reuse = False
    try:
        async with asyncio.timeout(timeout_s):
            try:
                response = await endpoint.http.post(orjson.dumps(kwargs), endpoint.headers)
            except Unsendable as err:  # e.g. a control character in a header (the key's)
                raise Fatal(f"the request cannot be sent: {scrub_secrets(str(err))}") from None
            if response.status >= 400:
                raw = await response.read(ERROR_BODY_LIMIT)
                reuse = True
                raise status_error(response.status, raw, response.headers)
        watch = _TextWatch(idle_timeout_s, timeout_s + idle_timeout_s, answer_max_s, called_at)
        if before_body is not None:
            watch.busy = True
            await before_body()
            watch.done_waiting()
        reader = _SseReader(on_text, watch, on_tier)
        watch.cap = reader.cap
        response.done.add_done_callback(reader.closed)
        response.read_into(reader.feed)
        end = await reader.ended
        reuse = reader.saw_done
        return end
    except asyncio.CancelledError:
        why = watch.why() if watch is not None else None
        if why is not None:
            raise why from None
        raise
    except TimeoutError:
        if watch is not None:
            raise Retryable("stream cut: a read timed out") from None
        raise Retryable("provider timed out before answering") from None
    except OSError as err:  # ConnectionError (a cut, a malformed answer), TLS errors
        if watch is not None:
            raise Retryable(f"stream cut: {_why(err)}") from None
        raise Retryable(f"cannot reach the provider: {_why(err)}") from None
    except orjson.JSONDecodeError:
        raise Retryable("malformed chunk from the provider") from None
    finally:
        if watch is not None:
            watch.close()
        if response is not None:
            response.release(reuse=reuse)
        if reader is not None and reader.ended.done() and not reader.ended.cancelled():
            reader.ended.exception()  # seen (a cancel can leave the stream's end unread)


def _why(err: OSError) -> str:
    return str(err) or type(err).__name__


class _SseReader:
    """The body's SSE lines, parsed as they arrive (on the loop, in the connection's callback):
    each text to `on_text`, the end into `ended`."""

    def __init__(
        self, on_text: OnText, watch: _TextWatch, on_tier: Callable[[str], None] | None = None
    ) -> None:
        self.on_text = on_text
        self.on_tier = on_tier  # told the tier once a chunk names it (a cut answer is billed so)
        self.watch = watch
        self.ended: asyncio.Future[AttemptEnd] = asyncio.get_running_loop().create_future()
        self.saw_done = False
        self.rest = b""
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.tier: str | None = None
        self.index: Any = _UNSEEN  # the answer's choice: the first index the stream names

    def feed(self, data: bytes) -> None:
        if self.ended.done():
            return  # what follows the end (or a stop) is not read
        try:
            self._lines(data)
        except Exception as err:  # the stream ends with it (the connection is closed too)
            self.ended.set_exception(err)
            raise

    def _lines(self, data: bytes) -> None:
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        if len(self.rest) > LINE_MAX_BYTES:  # unbounded, it would stall the loop's every stream
            raise Retryable(f"a line of the provider's answer is over {LINE_MAX_BYTES} bytes")
        texted = False
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, `event:` lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.saw_done = True
                self.ended.set_result(_end(self.finish, self.usage, self.tier))
                return
            obj = orjson.loads(payload)
            error, tier, usage, choices = _chunk(obj)
            if error is not None:
                raise stream_error(obj)
            if self.tier is None and tier is not None:  # every chunk names it; billed at it
                self.tier = tier
                if self.on_tier is not None:
                    self.on_tier(tier)
            if usage:
                self.usage = usage
            for index, text, finish in choices:
                if index != self.index:  # a request asks one answer: the first choice's
                    if self.index is not _UNSEEN:
                        continue  # another's (a relay answering n > 1) is not spliced in
                    self.index = index
                if text:
                    texted = True
                    if not self.on_text(text):
                        self.ended.set_result(AttemptEnd("length", None, self.tier))
                        return
                if finish:
                    self.finish = _finish_reason(finish)
        if texted:  # once a read: a clock read, not one a chunk
            self.watch.texted()

    def cap(self) -> None:
        """End the answer here, as one cut at its token limit (the time limit's)."""
        if not self.ended.done():
            self.ended.set_result(AttemptEnd("length", None, self.tier))

    def closed(self, done: asyncio.Future[None]) -> None:
        """The response is over (complete, cut, or failed in `feed`)."""
        if self.ended.done():
            return
        err = done.exception()
        if err is not None:
            self.ended.set_exception(err)
        else:
            # `data: [DONE]` ends a stream (some servers never send a finish_reason); a body
            # that ends before it is a cut.
            self.ended.set_exception(ResponseCut("the connection closed before [DONE]"))


def _end(finish: str | None, usage: dict[str, Any] | None, tier: str | None) -> AttemptEnd:
    if finish == "content_filter":
        raise Fatal("the provider's content filter stopped the answer")
    return AttemptEnd(finish, usage, tier)


LINE_MAX_BYTES = 1 << 20
_UNSEEN = object()


def _chunk(obj: Any) -> tuple[Any, Any, Any, list[tuple[Any, str | None, Any]]]:
    """A chunk's (error, service tier, usage, [(index, text, finish reason)] of its choices);
    a chunk not of that shape is a malformed chunk (retried)."""
    try:
        choices = []
        for choice in obj.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text and not isinstance(text, str):
                text = _content_text(text)
            index = choice.get("index")
            choices.append((0 if index is None else index, text, choice.get("finish_reason")))
        return obj.get("error"), obj.get("service_tier"), obj.get("usage"), choices
    except (AttributeError, TypeError):
        raise Retryable("malformed chunk from the provider") from None


def _content_text(content: object) -> str:
    """A delta's content given as parts (as some relays send it): their texts joined. Any
    other shape is a TypeError (a malformed chunk)."""
    if not isinstance(content, list):
        raise TypeError(f"content is {type(content).__name__}")
    return "".join(
        part["text"]
        for part in content
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    )


def _finish_reason(value: object) -> str:
    """A provider's finish reason as the row can hold it (a relay may send anything)."""
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return bounded(text, "finish_reason")
