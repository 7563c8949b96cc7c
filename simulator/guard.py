"""What keeps the simulator from being a hole: the admin API behind the key, bodies bounded.

- ``/_sim/*`` (config, stats, reset) needs the bearer key when one is configured, and answers
  only loopback clients when none is: it can read and swap the key and switch faults on.
- Every request body is bounded before it is read (``BodyLimit``, pure ASGI): a declared
  ``Content-Length`` over the limit is answered 413 at once, a chunked body is cut off at the
  limit. ``/v1/files`` gets ``max_file_bytes`` (plus room for the multipart framing), the rest
  ``max_body_bytes``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from simulator.errors import ApiError
from simulator.state import SimState, check_key, sim

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
MULTIPART_ROOM = 1024 * 1024  # boundaries and part headers around an uploaded file

Handler = Callable[[Request], Awaitable[Response]]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def admin(handler: Handler) -> Handler:
    """Wrap an admin endpoint: the configured key, or (no key) a loopback client only."""

    @wraps(handler)
    async def wrapper(request: Request) -> Response:
        state = sim(request)
        try:
            if state.config.api_key is None:
                host = request.client.host if request.client else ""
                if host not in LOOPBACK:
                    raise ApiError(
                        403,
                        "The admin API of a simulator without an API key answers loopback "
                        "clients only (start it with an API key to reach it from elsewhere).",
                        code="admin_forbidden",
                    )
            else:
                check_key(state, request)
            return await handler(request)
        except ApiError as error:
            state.stats.count(f"errors.{error.status}")
            return error.response()

    return wrapper


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a request body over the limit, before it is read."""

    def __init__(self, app: Any, state: SimState) -> None:
        self.app = app
        self.state = state

    def limit(self, path: str) -> int:
        config = self.state.config
        if path.startswith("/v1/files"):
            return config.max_file_bytes + MULTIPART_ROOM
        return config.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _too_large(send, limit)
            return
        seen = 0
        started = False

        async def bounded_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, watched_send)
        except _TooLarge:
            if not started:
                await _too_large(send, limit)


async def _too_large(send: Send, limit: int) -> None:
    response = ApiError(
        413,
        f"Request body too large: the limit is {limit:,} bytes.",
        code="request_too_large",
    ).response()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(response.body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": response.body})
