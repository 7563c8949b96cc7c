"""Reading a call's JSON body: the content type checked and the size bounded before reading."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from sheepdog.api.errors import ApiError


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is over the limit of {limit:,} bytes", "body_too_large")


async def read_json(request: Request, limit: int) -> tuple[Any, int]:
    """The body as JSON, and its size in bytes: 415 unless it is application/json sent
    uncompressed (a gzip body would read as bytes that are not JSON), 413 past
    `limit` bytes (refused from Content-Length before anything is read, else as soon as the
    count passes it), 400 when it does not parse."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise ApiError(
            415,
            f"the body must be application/json, got {kind or 'no content type'}",
            "unsupported_media_type",
        )
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415,
            f"the body must be sent uncompressed, got Content-Encoding {encoding[:40]}",
            "unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length", "invalid_request")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "invalid request: the body is empty", "invalid_request")
    try:
        return orjson.loads(raw), len(raw)
    except orjson.JSONDecodeError as err:
        raise ApiError(
            400, f"invalid request: the body is not valid JSON ({err})", "invalid_json"
        ) from None
