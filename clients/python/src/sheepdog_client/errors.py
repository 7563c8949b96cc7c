"""Exceptions the client raises: one class per kind of refusal, carrying what the server said."""

from __future__ import annotations

import math
from typing import Any

MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is taken as this (a stream reconnects then)


class SheepdogError(Exception):
    """Base class. `status` is the HTTP status (None when no answer came); `type`, `code`,
    `param` and `message` come from the server's `{"error": {...}}` body."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.body = body

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.status}: {self.message}"


class InvalidRequest(SheepdogError):
    """400 (or 413, 415, 422): the request was refused as it stands; nothing was enqueued."""


class AuthenticationError(SheepdogError):
    """401: the API key is missing, unknown or revoked."""


class PermissionDenied(SheepdogError):
    """403: the key may not do this."""


class BudgetExceeded(SheepdogError):
    """402 (or a `budget_exceeded` code): the tenant's budget cannot cover the request."""


class NotFound(SheepdogError):
    """404: no such request for this tenant (another tenant's id answers the same)."""


class Conflict(SheepdogError):
    """409: the request conflicts with the current state (e.g. an idempotency key in use);
    `retry_after` is the server's `Retry-After` in seconds, when given."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class RateLimited(SheepdogError):
    """429: too many calls; `retry_after` is the server's `Retry-After` in seconds, when given."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unavailable(SheepdogError):
    """503 (or another 5xx): the server or a service behind it (Redis, the database) is away."""


class APIConnectionError(SheepdogError):
    """No answer: the server could not be reached or the connection broke."""


class WaitTimeout(SheepdogError, TimeoutError):
    """`result(wait=…)` or a stream did not see the request end in time."""


class RequestFailed(SheepdogError):
    """The request ended `failed` or `cancelled`; `message` is its reason."""

    def __init__(self, message: str, *, request_id: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.request_id = request_id


_BY_STATUS: dict[int, type[SheepdogError]] = {
    400: InvalidRequest,
    401: AuthenticationError,
    402: BudgetExceeded,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    415: InvalidRequest,
    422: InvalidRequest,
    429: RateLimited,
}


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, within 0 to MAX_RETRY_AFTER_S; None for none, an HTTP date
    (rare from an API: the caller backs off on its own) or a value that is no number
    ("inf", "nan", "1e999")."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def error_from_response(status: int, body: Any, headers: Any) -> SheepdogError:
    """The exception for an error answer: by `code` first (a budget refusal may come as 429),
    then by status."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or f"HTTP {status}")
        fields = {k: err.get(k) for k in ("type", "code", "param")}
        fields = {k: (None if v is None else str(v)) for k, v in fields.items()}
    else:
        message = f"HTTP {status}" + (f": {body}" if isinstance(body, str) and body else "")
        fields = {"type": None, "code": None, "param": None}
    kw: dict[str, Any] = {"status": status, "body": body, **fields}
    if fields["code"] == "budget_exceeded" or fields["type"] == "budget_exceeded":
        return BudgetExceeded(message, **kw)
    cls = _BY_STATUS.get(status) or (Unavailable if status >= 500 else SheepdogError)
    if cls is RateLimited or cls is Conflict:
        return cls(message, retry_after=_retry_after(headers.get("retry-after")), **kw)
    return cls(message, **kw)
