"""Sheepdog's own API, for every priority: submit one request or a list, read, list, cancel,
and follow a request's messages as server-sent events.

- `POST /v1/requests`: a request object (one line of `sheepdog submit --file`) -> 202
  `{"id"}`; a list of them (all or nothing) -> 202 `{"ids"}`.
- `GET /v1/requests/{id}` -> the RequestView; `POST /v1/requests/{id}/cancel` -> `{"id",
  "cancelled", "status"}`.
- `GET /v1/requests?status=&since=&cursor=&limit=` -> `{"data", "next_cursor"}`, newest first.
- `GET /v1/requests/{id}/events`: `id: <seq>`, `event: <type>`, `data: <message JSON>`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING

import orjson
import redis
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from models.request import REQUEST_ID
from models.status import Status, is_final
from models.tables import in_utc
from sheepdog.api.body import read_json
from sheepdog.api.errors import ApiError, not_found
from sheepdog.api.responses import FastJSONResponse
from sheepdog.api.tenancy import public
from streaming.follow import Tick, follow, open_feed

if TYPE_CHECKING:
    from sheepdog.api.front import Front

MAX_LIST = 500
SMALL_NUMBER = re.compile(r"[0-9]{1,6}")  # ASCII digits only (str.isdigit takes "²")
log = logging.getLogger("sheepdog.api")
SEQ = re.compile(r"-?[0-9]{1,18}")  # a seq, or -1 for none: within 64 bits, and the next too
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
EVENT = b"id: %d\nevent: %s\ndata: %s\n\n"  # one message as a server-sent event


def _front(request: Request) -> Front:
    return request.app.state.front  # type: ignore[no-any-return]


async def submit(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    body, size = await read_json(request, front.settings.api_max_body_bytes)
    as_list = isinstance(body, list)
    items = body if as_list else [body]
    if not items:
        raise ApiError(400, "invalid request: the list is empty", "invalid_request")
    header_key = (request.headers.get("idempotency-key") or "").strip()
    if header_key:  # (an empty one is none, as on the chat endpoint)
        items = [with_header_key(body, header_key, as_list)]
    ids = await front.submit(who.tenant, items, as_list, size)
    return FastJSONResponse({"ids": ids} if as_list else {"id": ids[0]}, status_code=202)


def with_header_key(body: object, key: str, as_list: bool) -> object:
    """The request with the `Idempotency-Key` header's key (the standard header, which HTTP
    clients send on a retry); a list takes each request's own `idempotency_key`, and a body
    that names another key is a contradiction: both are 400s."""
    if as_list:
        raise ApiError(
            400,
            "invalid request: Idempotency-Key keys one request; in a list, give each request "
            "its idempotency_key",
            "invalid_request",
            "Idempotency-Key",
        )
    if not isinstance(body, dict):
        return body  # refused by the request's own validation
    given = body.get("idempotency_key")
    if given is not None and given != key:
        raise ApiError(
            400,
            "invalid request: the Idempotency-Key header and the body's idempotency_key differ",
            "invalid_request",
            "Idempotency-Key",
        )
    return {**body, "idempotency_key": key}


async def get_one(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    rid = request.path_params["id"]
    view = await run_in_threadpool(front.tenancy.get, who.tenant, rid)
    if view is None:
        raise not_found(rid)
    return FastJSONResponse(public(view))


async def cancel(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    rid = request.path_params["id"]
    outcome = await run_in_threadpool(front.tenancy.cancel, who.tenant, rid)
    if outcome is None:
        raise not_found(rid)
    cancelled, status = outcome
    return FastJSONResponse({"id": rid, "cancelled": cancelled, "status": status})


def _encode_cursor(created_at: datetime, rid: str) -> str:
    raw = orjson.dumps([created_at.isoformat(), rid])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, rid = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not (isinstance(rid, str) and REQUEST_ID.fullmatch(rid)):
            raise ValueError(rid)
        return in_utc(datetime.fromisoformat(at)), rid
    except (ValueError, TypeError, OverflowError, orjson.JSONDecodeError):
        raise ApiError(
            400, "invalid request: cursor is not one this API gave", "invalid_cursor", "cursor"
        ) from None


def _since(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return in_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except (ValueError, OverflowError):
        raise ApiError(
            400,
            f"invalid request: since {value[:40]!r} is not an ISO 8601 time",
            "invalid_request",
            "since",
        ) from None


async def list_requests(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    q = request.query_params
    status = q.get("status") or None
    if status is not None and status not in {s.value for s in Status}:
        known = ", ".join(s.value for s in Status)
        raise ApiError(
            400,
            f"invalid request: unknown status {status!r} (known: {known})",
            "invalid_request",
            "status",
        )
    raw_limit = q.get("limit") or "50"  # an empty one is none, as every empty filter here
    if not SMALL_NUMBER.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIST:
        raise ApiError(
            400, f"invalid request: limit must be 1 to {MAX_LIST}", "invalid_request", "limit"
        )
    limit = int(raw_limit)
    before = _decode_cursor(q["cursor"]) if q.get("cursor") else None
    views = await run_in_threadpool(
        front.tenancy.list, who.tenant, status, _since(q.get("since")), before, limit + 1
    )
    more = len(views) > limit
    views = views[:limit]
    cursor = _encode_cursor(views[-1].created_at, views[-1].id) if more else None
    return FastJSONResponse({"data": [public(v) for v in views], "next_cursor": cursor})


def last_event_id(request: Request) -> int:
    """The seq the caller has (Last-Event-ID header, or ?last_event_id=), -1 for none."""
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None or raw == "":
        return -1
    if not SEQ.fullmatch(raw.strip()):
        raise ApiError(
            400,
            f"invalid request: Last-Event-ID {raw[:40]!r} is not a seq",
            "invalid_request",
            "Last-Event-ID",
        )
    raw = raw.strip()
    return -1 if raw.startswith("-") else int(raw)  # "-0" is none too, not seq 0


async def events(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request, allow_query=True)
    rid = request.path_params["id"]
    after = last_event_id(request)
    status = await front.stream_status(who.tenant, rid)
    if status is None:
        raise not_found(rid)
    settings = front.settings
    # The log's first read before the answer's head: Redis away is a 503 here, not a 200 whose
    # body breaks.
    opened = await open_feed(rid, settings, front.logs.feed)

    async def body() -> AsyncIterator[bytes]:
        with front.metrics.stream_open("/v1/requests/{id}/events"):
            yield b"retry: 1000\n\n"  # EventSource: reconnect after 1 s, with Last-Event-ID
            # Closed as the loop is left (a return inside it): its feed leaves the reader then.
            async with contextlib.aclosing(
                follow(
                    rid,
                    settings,
                    after=after,
                    max_s=settings.api_events_max_s,
                    keepalive_s=settings.api_keepalive_s,
                    row_known_open=not is_final(status),
                    opened=opened,
                )
            ) as messages:
                try:
                    async for msg in messages:
                        if isinstance(msg, Tick):
                            yield b": keepalive\n\n"
                            continue
                        data = orjson.dumps(msg.model_dump(mode="json", exclude_none=True))
                        yield EVENT % (msg.seq, msg.type.encode(), data)
                except (redis.RedisError, OSError) as err:
                    # Ended without a final event: the caller resumes from its last id.
                    log.warning("api: event stream of %s ended, Redis lost: %s", rid, err)

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
