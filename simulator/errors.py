"""OpenAI's JSON error shape and the status codes the SDK maps to its exception classes."""

from __future__ import annotations

import orjson
from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_ or _TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        """The error object (the value of the top-level ``error`` key)."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def response(self) -> Response:
        """The HTTP response for this error."""
        return Response(
            orjson.dumps({"error": self.body()}),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    """A 404 ``invalid_request_error``."""
    return ApiError(404, message, param=param, code=code)


def model_not_found(model: object) -> ApiError:
    """A 404 for a model the simulator does not serve."""
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def fault_error(status: int, message: str | None, retry_after_s: float) -> ApiError:
    """The error an injected status fault answers with."""
    if status == 429:
        return ApiError(
            429,
            message or "Rate limit reached for requests (simulated). Please try again later.",
            code="rate_limit_exceeded",
            type_="requests",
            headers={"Retry-After": format(retry_after_s, "g")},
        )
    if status >= 500:
        return ApiError(
            status,
            message or "The server had an error while processing your request (simulated).",
            code=None,
        )
    return ApiError(status, message or f"Simulated error {status}.", code="simulated_error")


def json_response(
    data: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response encoded with orjson."""
    return Response(
        orjson.dumps(data), status_code=status, headers=headers, media_type="application/json"
    )
