"""The asynchronous client: `AsyncClient`, the twin of `Client` (same methods, awaited)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx

from sheepdog_client import _common as c
from sheepdog_client._sse import LineSplitter
from sheepdog_client.errors import (
    APIConnectionError,
    RateLimited,
    SheepdogError,
    Unavailable,
    WaitTimeout,
)
from sheepdog_client.models import CancelResult, Event, Page, RequestView

MAX_POLL_S = 2.0


class AsyncClient:
    """`async with AsyncClient(base_url, api_key=…) as client:` — see `Client` for each method."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = c.DEFAULT_TIMEOUT_S,
        max_reconnects: int = 5,
        max_retries: int = 2,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = c.root_url(base_url)
        self.timeout = timeout
        self.max_reconnects = max_reconnects
        self.max_retries = max_retries
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._owns_http = http_client is None
        self._headers = c.headers(api_key)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> Any:
        url = self.base_url + path
        sent = self._headers if headers is None else {**self._headers, **headers}
        try:
            response = await self._http.request(method, url, headers=sent, **kw)
        except httpx.HTTPError as exc:
            raise c.connection_error(exc, method, url) from exc
        return c.decode(response)

    async def _send(self, path: str, body: Any) -> Any:
        content = c.encode(body)
        resends = 0
        while True:
            try:
                return await self._call("POST", path, c.JSON_BODY, content=content)
            except SheepdogError as err:
                delay = c.resend_delay(err, resends, self.max_retries)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            resends += 1

    async def submit(
        self,
        request: Mapping[str, Any] | None = None,
        /,
        *,
        model: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        priority: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | Sequence[str] | None = None,
        max_cost_usd: Any = None,
        deadline: datetime | str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        fields = {
            "model": model,
            "messages": messages,
            "priority": priority,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stop": stop,
            "max_cost_usd": max_cost_usd,
            "deadline": deadline,
            "metadata": metadata,
            "idempotency_key": idempotency_key,
        }
        body = c.request_body(request, fields)
        return str(c.field(await self._send("/v1/requests", body), "id"))

    async def submit_many(self, requests: Sequence[Mapping[str, Any]]) -> builtins.list[str]:
        body = [dict(r) for r in requests]
        return [str(i) for i in c.field(await self._send("/v1/requests", body), "ids")]

    async def get(self, request_id: str) -> RequestView:
        return RequestView.model_validate(await self._call("GET", c.request_path(request_id)))

    async def result(self, request_id: str, wait: float = 0.0) -> RequestView:
        deadline = time.monotonic() + wait
        delay = 0.05
        while True:
            view = await self.get(request_id)
            if view.is_final:
                return view
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(
                    f"request {request_id} has not ended after {wait}s (status {view.status})"
                )
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 1.5, MAX_POLL_S)

    async def cancel(self, request_id: str) -> CancelResult:
        body = await self._send(c.request_path(request_id, "/cancel"), {})
        return CancelResult.model_validate(body)

    def stream(
        self, request_id: str, *, last_event_id: int | None = None, timeout: float | None = None
    ) -> AsyncEventStream:
        """`async for event in client.stream(id)`; see `Client.stream`."""
        return AsyncEventStream(self, request_id, last_event_id, timeout)

    async def stream_text(self, request_id: str, *, timeout: float | None = None) -> str:
        return await self.stream(request_id, timeout=timeout).final_text()

    async def list(
        self,
        *,
        status: str | None = None,
        since: datetime | str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> Page:
        params = c.list_params(status, since, cursor, limit)
        return Page.model_validate(await self._call("GET", "/v1/requests", params=params))


class AsyncEventStream:
    """The async twin of `EventStream`: `async for`, `.text`, `.final`, `await .final_text()`."""

    def __init__(
        self,
        client: AsyncClient,
        request_id: str,
        last_event_id: int | None,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._state = c.StreamState(request_id, last_event_id)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._iter: AsyncGenerator[Event, None] | None = None

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def text(self) -> str:
        return self._state.text

    @property
    def final(self) -> Event | None:
        return self._state.final

    @property
    def reconnects(self) -> int:
        return self._state.reconnects

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._iter is None:
            self._iter = self._events()
        return await self._iter.__anext__()

    async def aclose(self) -> None:
        if self._iter is not None:
            await self._iter.aclose()

    async def final_text(self) -> str:
        async for _ in self:
            pass
        return c.final_text(self._state)

    def _read_timeout(self) -> httpx.Timeout:
        left = None if self._deadline is None else max(0.01, self._deadline - time.monotonic())
        read = self._client.timeout if left is None else min(self._client.timeout, left)
        return httpx.Timeout(self._client.timeout, read=read)

    async def _events(self) -> AsyncGenerator[Event, None]:
        state, client = self._state, self._client
        url = client.base_url + c.request_path(state.request_id, "/events")
        failures = 0
        while True:
            c.check_deadline(state, self._deadline, self._timeout)
            progressed = quiet = alive = opened = False
            cause: BaseException | None = None
            try:
                async with client._http.stream(
                    "GET",
                    url,
                    headers={**client._headers, **state.resume_headers()},
                    timeout=self._read_timeout(),
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        c.decode(response)  # raises the mapped error
                    opened = True
                    lines = _lines(response)
                    async for line in lines:
                        c.check_deadline(state, self._deadline, self._timeout)
                        alive = alive or line.startswith(":")
                        sse = state.decoder.feed(line)
                        if sse is None:
                            continue
                        event = state.accept(sse)
                        if event is None:
                            continue
                        progressed = True
                        yield event
                        if event.is_final:
                            await _read_to_end(lines)
                            return
            except httpx.ReadTimeout as exc:
                # A quiet wait once the server answered; no answer at all is a hung server.
                cause, quiet = exc, opened
            except (RateLimited, Unavailable, httpx.HTTPError, c.Gap) as exc:
                cause = exc
            # A connection that stayed open for a keep-alive is no failure when it ends (the server
            # ends every follow after api_events_max_s; a low request's may take hours).
            failures = 1 if (progressed or quiet or alive) else failures + 1
            if failures > client.max_reconnects:
                raise APIConnectionError(
                    f"event stream of {state.request_id} broke {failures} times in a row"
                    f" (last: {cause or 'closed before the end'})"
                ) from cause
            state.reconnects += 1
            await asyncio.sleep(c.reconnect_delay(failures, state, cause, self._deadline))


async def _lines(response: httpx.Response) -> AsyncIterator[str]:
    splitter = LineSplitter()
    async for chunk in response.aiter_bytes():
        for line in splitter.feed(chunk):
            yield line


async def _read_to_end(lines: AsyncIterator[str]) -> None:
    """Read what is left of an ended stream's body (the server ends it right after the final
    event), so that its connection goes back to the pool: one left half-read is closed, and
    the next call pays a new connection. A body that goes on is given up after c.DRAIN_S."""
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(c.DRAIN_S):
            async for _ in lines:
                pass


__all__ = ["AsyncClient", "AsyncEventStream"]
