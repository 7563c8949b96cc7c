"""Errors of the front door, all in OpenAI's shape: `{"error": {message, type, param, code}}`.

The official SDKs map the status to their exception classes (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, ...); `code` says which Sheepdog
rule refused the call.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import Response

from core.errors import (
    BudgetExceeded,
    IdempotencyConflict,
    InvalidRequest,
    ServiceUnavailable,
)
from sheepdog.api.responses import FastJSONResponse
from webhooks.crypto import WebhookKeyError

log = logging.getLogger("sheepdog.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answer: status, one-line message, OpenAI `code` and `param`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)

    def response(self) -> Response:
        return FastJSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def not_found(request_id: str) -> ApiError:
    """The one answer for an unknown id and for another tenant's: they look alike."""
    return ApiError(404, f"no request {request_id}", "request_not_found", "id")


def from_sheepdog(err: Exception) -> ApiError:
    """The API error for one of Sheepdog's own errors (the CLI's one-line reasons)."""
    if isinstance(err, IdempotencyConflict):  # as the IETF Idempotency-Key draft answers it
        if err.in_progress:  # the SDKs resend a 409 after a back-off
            code, after = "idempotency_key_in_progress", {"Retry-After": "1"}
            return ApiError(409, str(err), code, "Idempotency-Key", after)
        return ApiError(409, str(err), "idempotency_key_conflict", "Idempotency-Key")
    if isinstance(err, InvalidRequest):
        return ApiError(400, str(err), "invalid_request", err.param)
    if isinstance(err, BudgetExceeded):
        return ApiError(402, str(err), "budget_exceeded")
    if isinstance(err, ServiceUnavailable):
        # The URL and hint are for operators; a caller learns which service is away.
        return ApiError(503, f"{err.service} is unavailable; try again later", "unavailable")
    if isinstance(err, WebhookKeyError):  # the server's configuration, not the call's fault
        log.error("api: %s", err)
        return ApiError(503, "webhook signing is not configured on this server", "unavailable")
    log.error("api: unexpected %s: %s", type(err).__name__, err)
    return ApiError(500, "internal error", "internal_error")
