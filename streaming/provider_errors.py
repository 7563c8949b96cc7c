"""A provider's refusals, sorted: `Retryable` (the caller backs off and tries again) and
`Fatal` (the request fails at once), from an HTTP status and error body (read as the SDK reads
it), an error event in a stream, and Retry-After."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

import orjson

from core.errors import scrub_secrets

RETRYABLE_STATUS = frozenset({408, 409, 429})


class Retryable(Exception):
    """Worth another attempt: connection trouble, 429, 5xx, a cut or stalled stream."""

    def __init__(
        self, reason: str, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status  # the provider's HTTP status, when it answered one


class Fatal(Exception):
    """The provider refused the request for good (400, 401, 403, 404, content filter)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RejectsStreamOptions(Fatal):
    """A 400 naming stream_options: the provider does not take `include_usage`."""


RETRY_AFTER_MAX_S = 60.0


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` / `retry-after` (seconds or an HTTP date), at most
    RETRY_AFTER_MAX_S; None for a value that is not a finite number of seconds. A provider
    asking for a day would otherwise hold the stream, its row and every worker's shared
    limiter that long; capped, a long throttle still slows every worker down."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            seconds = float(ms) / 1000
        except ValueError:
            seconds = math.nan
        if math.isfinite(seconds):
            return _capped(seconds)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        seconds = email.utils.mktime_tz(parsed) - time.time()
    return _capped(seconds) if math.isfinite(seconds) else None


def _capped(seconds: float) -> float:
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def error_message(status: int, raw: bytes) -> str:
    """An error answer's message, read as the SDK reads it: `error.message` of a JSON body,
    else "Error code: N - " and the body."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return f"Error code: {status} - {raw.decode(errors='replace').strip()}"


def status_error(status: int, raw: bytes, headers: Mapping[str, str]) -> Exception:
    message = scrub_secrets(error_message(status, raw))
    if status == 400 and "stream_options" in message:
        return RejectsStreamOptions(f"provider rejected stream_options: {message}")
    if status in RETRYABLE_STATUS or status >= 500:
        return Retryable(f"provider answered {status}", retry_after_s(headers), status)
    return Fatal(f"provider rejected the request ({status}): {message}")


def stream_error(obj: dict[str, Any]) -> Exception:
    error = obj.get("error")
    detail = error if isinstance(error, dict) else {"message": str(error)}
    message = scrub_secrets(str(detail.get("message") or "error event in the stream"))
    kind = str(detail.get("type") or detail.get("code") or "")
    if "server" in kind or "rate" in kind or "overloaded" in kind:
        return Retryable(f"provider error mid-stream: {message}")
    return Fatal(f"provider error mid-stream: {message}")
