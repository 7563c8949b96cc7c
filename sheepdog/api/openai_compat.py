"""OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`: the official SDKs work
with only their base URL and API key changed. The response id is the Sheepdog request id.

- `stream: true`: chat.completion.chunk events relayed from the request's replay log as they
  arrive, a usage chunk when `stream_options.include_usage`, `data: [DONE]` last. A retry that
  restarts the answer after text went out ends the response with an error event naming the
  request id (an OpenAI client cannot take text back; the request goes on, and
  `GET /v1/requests/{id}` or its event stream has the whole answer). A restart before any text
  is invisible.
- `stream: false`: waits for the end (at most api_completion_wait_s) and answers one
  chat.completion with usage.
- Priority comes from `X-Sheepdog-Priority` (high or normal; default normal). `low` is refused
  (400): it may wait hours for a batch; use POST /v1/requests.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
import redis
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from core.errors import InvalidRequest
from models.stream_message import StreamMessage
from sheepdog.api.body import read_json
from sheepdog.api.errors import ApiError, error_body
from sheepdog.api.openai_body import ChatBody, openai_param, parse_chat_body, to_request
from sheepdog.api.responses import FastJSONResponse
from streaming.follow import Tick, follow

log = logging.getLogger("sheepdog.api")

if TYPE_CHECKING:
    from sheepdog.api.front import Front

ENDPOINT = "/v1/chat/completions"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
NO_RETRY = {"x-should-retry": "false"}  # the SDKs would resubmit: the request ran


def _front(request: Request) -> Front:
    return request.app.state.front  # type: ignore[no-any-return]


async def models(request: Request) -> Response:
    front = _front(request)
    await front.auth.principal(request)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "sheepdog"}
        for name in front.client.table.names()
    ]
    return FastJSONResponse({"object": "list", "data": data})


def _usage(msg: StreamMessage) -> dict[str, int] | None:
    if msg.usage is None:
        return None
    p, c = msg.usage.prompt_tokens, msg.usage.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _ended_error(rid: str, msg: StreamMessage) -> ApiError:
    reason = msg.error or "failed"
    if reason == "cancelled":
        return ApiError(409, f"request {rid} was cancelled", "request_cancelled", headers=NO_RETRY)
    return ApiError(502, f"request {rid} failed: {reason}", "request_failed", headers=NO_RETRY)


def _restarted(rid: str) -> ApiError:
    return ApiError(
        502,
        f"request {rid} restarted its answer after a provider retry; the text sent so far is"
        f" void. The request goes on: read it with GET /v1/requests/{rid}",
        "stream_restarted",
        headers=NO_RETRY,
    )


def _timed_out(rid: str, wait_s: float) -> ApiError:
    return ApiError(
        504,
        f"request {rid} has not ended after {wait_s:g}s; it goes on: read it with"
        f" GET /v1/requests/{rid}",
        "timeout",
        headers=NO_RETRY,
    )


async def chat_completions(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    raw, size = await read_json(request, front.settings.api_max_body_bytes)
    body = parse_chat_body(raw)
    sheepdog_request = to_request(body, request.headers)
    try:
        rid = (await front.submit(who.tenant, [sheepdog_request], False, size))[0]
    except (ApiError, InvalidRequest) as err:
        err.param = openai_param(err.param, body)
        raise
    if body.stream:
        return StreamingResponse(
            _chunks(front, rid, body), media_type="text/event-stream", headers=SSE_HEADERS
        )
    return await _complete(front, rid, body)


async def _complete(front: Front, rid: str, body: ChatBody) -> Response:
    wait_s = front.settings.api_completion_wait_s
    parts: list[str] = []
    # Closed as the loop is left (a return inside it): its feed leaves the reader then.
    async with contextlib.aclosing(
        follow(
            rid,
            front.settings,
            max_s=wait_s,
            keepalive_s=wait_s,
            row_known_open=True,
            feeds=front.logs.feed,
        )
    ) as messages:
        async for msg in messages:
            if isinstance(msg, Tick):
                continue
            if msg.type == "token":
                parts.append(msg.text or "")
            elif msg.type == "reset":
                parts.clear()
            elif msg.type == "error":
                raise _ended_error(rid, msg)
            else:
                return FastJSONResponse(
                    {
                        "id": rid,
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.model,
                        "system_fingerprint": None,
                        "choices": [
                            {
                                "index": 0,
                                "message": {
                                    "role": "assistant",
                                    "content": "".join(parts),
                                    "refusal": None,
                                },
                                "logprobs": None,
                                "finish_reason": msg.finish_reason or "stop",
                            }
                        ],
                        "usage": _usage(msg),
                    }
                )
    raise _timed_out(rid, wait_s)


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _chunks(front: Front, rid: str, body: ChatBody) -> AsyncIterator[bytes]:
    settings = front.settings
    created = int(time.time())
    base: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": body.model,
        "system_fingerprint": None,
    }
    if body.include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _event({**base, "choices": [choice]})

    sent_text = False
    with front.metrics.stream_open(ENDPOINT):
        yield chunk({"role": "assistant", "content": ""})
        # Closed as the loop is left (a return inside it): its feed leaves the reader then.
        async with contextlib.aclosing(
            follow(
                rid,
                settings,
                max_s=settings.api_completion_wait_s,
                keepalive_s=settings.api_keepalive_s,
                row_known_open=True,  # just submitted
                feeds=front.logs.feed,
            )
        ) as messages:
            try:
                async for msg in messages:
                    if isinstance(msg, Tick):
                        yield b": keepalive\n\n"
                    elif msg.type == "token":
                        if msg.text:
                            sent_text = True
                            yield chunk({"content": msg.text})
                    elif msg.type == "reset":
                        if sent_text:
                            yield _event(_restarted(rid).body())
                            return
                    elif msg.type == "error":
                        yield _event(_ended_error(rid, msg).body())
                        return
                    else:
                        yield chunk({}, msg.finish_reason or "stop")
                        if body.include_usage:
                            yield _event({**base, "choices": [], "usage": _usage(msg)})
                        yield b"data: [DONE]\n\n"
                        return
            except (redis.RedisError, OSError) as err:
                # The request goes on; this response cannot show the rest of it.
                log.warning("api: chat stream of %s ended, Redis lost: %s", rid, err)
                lost = f"the stream of {rid} was cut (Redis: {err}); it goes on:"
                lost += f" GET /v1/requests/{rid}"
                yield _event(error_body(503, lost, "unavailable"))
                return
        yield _event(
            error_body(504, _timed_out(rid, settings.api_completion_wait_s).message, "timeout")
        )
