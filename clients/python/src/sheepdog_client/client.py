"""The synchronous client."""

from __future__ import annotations

import builtins
import contextlib
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
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


class Client:
    """A Sheepdog front door: `Client("http://sheepdog:8080", api_key="sdk-…")`.

    Every call raises a `SheepdogError` subclass when the server refuses it (`InvalidRequest`,
    `AuthenticationError`, `BudgetExceeded`, `NotFound`, `RateLimited`, `Unavailable`, …) or
    `APIConnectionError` when no answer came. Use it as a context manager or call `close()`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = c.DEFAULT_TIMEOUT_S,
        max_reconnects: int = 5,
        max_retries: int = 2,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = c.root_url(base_url)
        self.timeout = timeout
        self.max_reconnects = max_reconnects
        self.max_retries = max_retries
        self._http = http_client or httpx.Client(timeout=timeout)
        self._owns_http = http_client is None
        self._headers = c.headers(api_key)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def _call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> Any:
        url = self.base_url + path
        sent = self._headers if headers is None else {**self._headers, **headers}
        try:
            response = self._http.request(method, url, headers=sent, **kw)
        except httpx.HTTPError as exc:
            raise c.connection_error(exc, method, url) from exc
        return c.decode(response)

    # -- submit -----------------------------------------------------------------------------

    def submit(
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
        """Submit one request (a dict, keyword arguments, or both: the keywords win); returns
        its id. The server validates it; a refusal raises `InvalidRequest` with its reason."""
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
        return str(c.field(self._send("/v1/requests", body), "id"))

    def submit_many(self, requests: Sequence[Mapping[str, Any]]) -> builtins.list[str]:
        """Submit a list all-or-nothing: every request is validated before any is enqueued."""
        body = [dict(r) for r in requests]
        return [str(i) for i in c.field(self._send("/v1/requests", body), "ids")]

    def _send(self, path: str, body: Any) -> Any:
        content = c.encode(body)
        resends = 0
        while True:
            try:
                return self._call("POST", path, c.JSON_BODY, content=content)
            except SheepdogError as err:
                delay = c.resend_delay(err, resends, self.max_retries)
                if delay is None:
                    raise
            time.sleep(delay)
            resends += 1

    # -- read back --------------------------------------------------------------------------

    def get(self, request_id: str) -> RequestView:
        """The request as it stands now; `NotFound` for an unknown id (or another tenant's)."""
        return RequestView.model_validate(self._call("GET", c.request_path(request_id)))

    def result(self, request_id: str, wait: float = 0.0) -> RequestView:
        """The request once it has ended, polling with back-off for up to `wait` seconds;
        `WaitTimeout` when it has not ended by then. A failed request is returned, not raised
        (its `error` says why)."""
        deadline = time.monotonic() + wait
        delay = 0.05
        while True:
            view = self.get(request_id)
            if view.is_final:
                return view
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(
                    f"request {request_id} has not ended after {wait}s (status {view.status})"
                )
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, MAX_POLL_S)

    def cancel(self, request_id: str) -> CancelResult:
        """Stop a request: a queued one never starts, a live stream stops. `cancelled` is False
        for one that had already ended, or is in a batch (`status` `batched`: it ends with the
        batch's answer)."""
        return CancelResult.model_validate(self._send(c.request_path(request_id, "/cancel"), {}))

    # -- follow -----------------------------------------------------------------------------

    def stream(
        self, request_id: str, *, last_event_id: int | None = None, timeout: float | None = None
    ) -> EventStream:
        """Follow a request's events (`token`, `reset`, `done`, `error`) from the start, or after
        `last_event_id`. A dropped connection is resumed with `Last-Event-ID`, so no event is
        missed or repeated; the iterator ends after `done` or `error`. `timeout` bounds the
        whole follow (None: until the request ends)."""
        return EventStream(self, request_id, last_event_id, timeout)

    def stream_text(self, request_id: str, *, timeout: float | None = None) -> str:
        """Follow a request to its end and return its final text (resets applied); raises
        `RequestFailed` with the reason when it fails or is cancelled."""
        return self.stream(request_id, timeout=timeout).final_text()

    # Last, so that `list` in the annotations above still means the builtin to readers.
    def list(
        self,
        *,
        status: str | None = None,
        since: datetime | str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> Page:
        """One page of this tenant's requests, newest first; pass `page.next_cursor` as
        `cursor` for the next (None on the last page)."""
        params = c.list_params(status, since, cursor, limit)
        return Page.model_validate(self._call("GET", "/v1/requests", params=params))


class EventStream:
    """Iterate for `Event`s; `.text` is the answer so far (a `reset` clears it), `.final` the
    `done` or `error` event once seen, `.reconnects` how many times it resumed."""

    def __init__(
        self, client: Client, request_id: str, last_event_id: int | None, timeout: float | None
    ) -> None:
        self._client = client
        self._state = c.StreamState(request_id, last_event_id)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._iter: Generator[Event, None, None] | None = None

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

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._iter is None:
            self._iter = self._events()
        return next(self._iter)

    def close(self) -> None:
        """Stop following (closes the connection)."""
        if self._iter is not None:
            self._iter.close()

    def final_text(self) -> str:
        """Consume the rest of the stream; the final text, or `RequestFailed` on `error`."""
        for _ in self:
            pass
        return c.final_text(self._state)

    def _read_timeout(self) -> httpx.Timeout:
        left = None if self._deadline is None else max(0.01, self._deadline - time.monotonic())
        read = self._client.timeout if left is None else min(self._client.timeout, left)
        return httpx.Timeout(self._client.timeout, read=read)

    def _events(self) -> Generator[Event, None, None]:
        state, client = self._state, self._client
        url = client.base_url + c.request_path(state.request_id, "/events")
        failures = 0
        while True:
            c.check_deadline(state, self._deadline, self._timeout)
            progressed = quiet = alive = opened = False
            cause: BaseException | None = None
            try:
                with client._http.stream(
                    "GET",
                    url,
                    headers={**client._headers, **state.resume_headers()},
                    timeout=self._read_timeout(),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        c.decode(response)  # raises the mapped error
                    opened = True
                    lines = _lines(response)
                    for line in lines:
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
                            _read_to_end(lines)
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
            time.sleep(c.reconnect_delay(failures, state, cause, self._deadline))


def _lines(response: httpx.Response) -> Iterator[str]:
    splitter = LineSplitter()
    for chunk in response.iter_bytes():
        yield from splitter.feed(chunk)


def _read_to_end(lines: Iterator[str]) -> None:
    """Read what is left of an ended stream's body (the server ends it right after the final
    event), so that its connection goes back to the pool: one left half-read is closed, and
    the next call pays a new connection (~1 ms here). A body that goes on (a proxy's
    comments) is given up after c.DRAIN_S, and its connection closed."""
    give_up = time.monotonic() + c.DRAIN_S
    with contextlib.suppress(httpx.HTTPError):
        for _ in lines:
            if time.monotonic() > give_up:
                return


__all__ = ["Client", "EventStream"]
