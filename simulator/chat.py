"""``POST /v1/chat/completions``: plain and SSE streaming answers, with chat faults applied.

The stream is a hand-written ASGI response: chunk JSON is pre-encoded once per request as a
prefix and a suffix around each token, so a chunk costs one ``orjson.dumps`` of a short string
and one ``send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from simulator.answers import Answer
from simulator.chat_request import (
    SYSTEM_FINGERPRINT,
    ChatRequest,
    completion_body,
    parse_chat_request,
    usage,
)
from simulator.errors import bad_request, fault_error, json_response
from simulator.faults import FAULT_HEADER, ChatFaults, parse_fault_header
from simulator.ids import new_id, now
from simulator.state import api, sim
from simulator.stats import Stats
from simulator.tiers import pace, parse_tier, served_tier

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment, as relays send while a model thinks
CUT_MESSAGE = "ASGI callable returned without completing response."


class _QuietCuts(logging.Filter):
    """Hide uvicorn's complaint about the streams we cut on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != CUT_MESSAGE


logging.getLogger("uvicorn.error").addFilter(_QuietCuts())


@api()
async def chat_completions(request: Request) -> Response:
    """Answer a chat-completion request (JSON or SSE)."""
    state = sim(request)
    stats = state.stats
    stats.count("chat.requests")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise bad_request("We could not parse the JSON body of your request.") from None
    if isinstance(body, dict):
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        stats.log_chat(str(body.get("model")), _is_stream(body), limit)
    else:
        stats.log_chat("", _is_stream(body))
    extra = parse_fault_header(request.headers.get(FAULT_HEADER))
    chat = parse_chat_request(body, state.models)
    config = state.config
    tier = served_tier(parse_tier(body), config)
    if config.reject_stream_options and chat.has_stream_options:
        raise bad_request(
            "Unrecognized request argument supplied: stream_options",
            param="stream_options",
            code="invalid_request_error",
        )
    faults = state.engine.chat(
        chat.model, chat.last_user_text(), extra, config.ttft_ms, config.chunk_delay_ms
    )
    if faults.applied:
        stats.count("faults.applied")
    if faults.status is not None:
        stats.count(f"faults.status.{faults.status}")
        raise fault_error(faults.status, faults.message, faults.retry_after_s)
    if tier == "flex":
        state.flex.take(config.flex_capacity)  # 429 when flex capacity has run out
    stats.count(f"chat.tier.{tier}")
    pace(faults, tier, config)
    answer = chat.answer(config.answer_tokens)
    if faults.append_text:
        answer = Answer((*answer.pieces, faults.append_text), answer.finish_reason)
    completion_id = new_id("chatcmpl-")
    if chat.stream:
        stats.count("chat.streams")
        stream = ChatStream(chat, answer, faults, completion_id, stats, tier)
        if tier == "flex":
            stream.on_end = state.flex.give_back
        return stream  # type: ignore[return-value]
    try:
        delay = faults.ttft_ms + faults.chunk_delay_ms * max(len(answer.pieces) - 1, 0)
        if delay:
            await asyncio.sleep(delay / 1000)
    finally:
        if tier == "flex":
            state.flex.give_back()
    stats.count("chat.completion_tokens", len(answer.pieces))
    return json_response(
        completion_body(chat, answer, completion_id, now(), tier),
        headers={"x-request-id": new_id("req_")},
    )


def _is_stream(body: object) -> bool:
    return isinstance(body, dict) and bool(body.get("stream"))


def _chunk_parts(
    chat: ChatRequest, completion_id: str, created: int, tier: str
) -> tuple[bytes, bytes]:
    """(head, tail) of an SSE chunk line; the choices/usage part goes in between."""
    head = orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": chat.model,
            "service_tier": tier,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
    )
    tail = b',"usage":null}\n\n' if chat.include_usage else b"}\n\n"
    return b"data: " + head[:-1] + b',"choices":', tail


def _choice(delta: dict[str, Any], finish_reason: str | None, index: int = 0) -> bytes:
    return orjson.dumps(
        [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )


class ChatStream:
    """ASGI response streaming one token per SSE chunk, with faults (delays, cut, stall)."""

    def __init__(
        self,
        chat: ChatRequest,
        answer: Answer,
        faults: ChatFaults,
        completion_id: str,
        stats: Stats,
        tier: str = "default",
    ) -> None:
        self.chat = chat
        self.answer = answer
        self.faults = faults
        self.completion_id = completion_id
        self.stats = stats
        self.tier = tier
        self.on_end: Callable[[], None] | None = None  # a flex stream gives its slot back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await self._run(send, gone)
        finally:
            watcher.cancel()
            if self.on_end is not None:
                self.on_end()

    async def _run(self, send: Send, gone: asyncio.Event) -> None:
        chat, faults, answer = self.chat, self.faults, self.answer
        head, tail = _chunk_parts(chat, self.completion_id, now(), self.tier)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-request-id", new_id("req_").encode()),
                ],
            }
        )
        if faults.ttft_ms:
            await self._pause(send, gone, faults.ttft_ms / 1000)
        first = head + _choice({"role": "assistant", "content": "", "refusal": None}, None) + tail
        await send(_body(first))
        piece_head = head + b'[{"index":0,"delta":{"content":'
        piece_tail = b'},"logprobs":null,"finish_reason":null}]' + tail
        delay = faults.chunk_delay_ms / 1000
        sent = 0
        for index, piece in enumerate(answer.pieces):
            if faults.cut_after is not None and index >= faults.cut_after:
                self.stats.count("faults.cut")
                return  # no more_body=False: uvicorn drops the connection mid-body
            if faults.stall_after is not None and index == faults.stall_after:
                self.stats.count("faults.stall")
                await self._pause(send, gone, faults.stall_s, stall=True)
            if delay and index:
                await self._pause(send, gone, delay)
            if gone.is_set():
                self.stats.count("chat.disconnects")
                self.stats.count("chat.completion_tokens", sent)
                return
            chunk = piece_head + orjson.dumps(piece) + piece_tail
            if faults.second_choice:  # as a relay answering n=2: another text in between
                chunk += head + _choice({"content": piece[::-1]}, None, index=1) + tail
            await send(_body(chunk))
            sent += 1
        self.stats.count("chat.completion_tokens", sent)
        if faults.stall_after is not None and faults.stall_after >= len(answer.pieces):
            self.stats.count("faults.stall")
            await self._pause(send, gone, faults.stall_s, stall=True)
        if faults.cut_after is not None and faults.cut_after <= len(answer.pieces):
            self.stats.count("faults.cut")
            return
        finish_reason = None if faults.no_finish_reason else answer.finish_reason
        end = head + _choice({}, finish_reason) + tail
        if chat.include_usage:
            counted = usage(chat.prompt_tokens(), len(answer.pieces), self.tier)
            used = orjson.dumps(counted if faults.stream_usage is None else faults.stream_usage)
            end += head + b"[]" + b',"usage":' + used + b"}\n\n"
        await send({"type": "http.response.body", "body": end + DONE, "more_body": False})

    async def _pause(
        self, send: Send, gone: asyncio.Event, seconds: float, stall: bool = False
    ) -> None:
        """Wait `seconds` (a stall ends early when the client goes), filled with keep-alive
        comments when the `keepalive_ms` fault asks for them."""
        every = self.faults.keepalive_ms
        if every is None:
            await (_wait(gone, seconds) if stall else asyncio.sleep(seconds))
            return
        until = asyncio.get_running_loop().time() + seconds
        while not gone.is_set():
            left = until - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await _wait(gone, min(every / 1000, left))
            if not gone.is_set():
                self.stats.count("faults.keepalives")
                await send(_body(KEEPALIVE))


def _body(data: bytes) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True}


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
