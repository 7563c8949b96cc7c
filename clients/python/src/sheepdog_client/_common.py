"""What the sync and async clients share: URLs, headers, request bodies, answers, back-off."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from sheepdog_client._sse import ServerSentEvent, SSEDecoder
from sheepdog_client.errors import (
    APIConnectionError,
    Conflict,
    RateLimited,
    RequestFailed,
    SheepdogError,
    WaitTimeout,
    error_from_response,
)
from sheepdog_client.models import Event

DEFAULT_TIMEOUT_S = 30.0
DRAIN_S = 0.5  # how long an ended event stream's rest is read for, to keep its connection
USER_AGENT = "sheepdog-client/0.1"
JSON_BODY = {"Content-Type": "application/json"}  # the header of a call with a body


def root_url(base_url: str) -> str:
    """The server's root: a trailing `/` or `/v1` is dropped, so both forms work."""
    url = base_url.rstrip("/")
    return url.removesuffix("/v1")


def headers(api_key: str | None) -> dict[str, str]:
    out = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def request_path(request_id: str, suffix: str = "") -> str:
    if not request_id:
        raise ValueError("request_id is empty")
    return f"/v1/requests/{quote(request_id, safe='')}{suffix}"


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    raise TypeError(f"cannot send a {type(value).__name__} as JSON")


def encode(body: Any) -> bytes:
    """JSON for the wire: decimals as strings (exact), datetimes in ISO 8601."""
    return json.dumps(body, default=_default, separators=(",", ":")).encode()


def request_body(request: Mapping[str, Any] | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """One request object: `request`'s keys, overridden by the keyword arguments given."""
    body = dict(request or {})
    body.update({k: v for k, v in fields.items() if v is not None})
    if not body:
        raise ValueError("submit needs a request: a dict or keyword arguments (model, messages…)")
    return body


def decode(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; the mapped exception for an error, and SheepdogError for
    anything else (a redirect, which is not followed, or a 2xx that is not JSON: a proxy's
    page, a wrong base URL), which would otherwise fail later, far from its cause."""
    status = response.status_code
    try:
        body: Any = response.json() if response.content else None
    except ValueError:
        if 200 <= status < 300:
            raise SheepdogError(
                f"unexpected answer from the server (HTTP {status}, not JSON): "
                f"{response.text!r:.200}",
                status=status,
            ) from None
        body = response.text
    if status >= 400:
        raise error_from_response(status, body, response.headers)
    if not 200 <= status < 300:
        where = response.headers.get("location", "")
        raise SheepdogError(
            f"unexpected HTTP {status} from the server{f' (to {where})' if where else ''}:"
            " redirects are not followed; is the base URL the front door's?",
            status=status,
        )
    return body


def connection_error(exc: httpx.HTTPError, method: str, url: str) -> SheepdogError:
    reason = str(exc) or type(exc).__name__
    return APIConnectionError(f"{method} {url}: {reason}")


def field(body: Any, name: str) -> Any:
    if not isinstance(body, dict) or name not in body:
        raise SheepdogError(f"unexpected answer from the server (no {name!r}): {body!r:.200}")
    return body[name]


def backoff(attempt: int, retry_ms: int | None = None, cap_s: float = 2.0) -> float:
    """Seconds before reconnect number `attempt` (1, 2, …): the server's `retry:` when it sent
    one (jittered), else jittered exponential from 0.1 s."""
    if (
        retry_ms is not None
    ):  # up to half as long again: clients cut together do not return together
        return retry_ms / 1000 * random.uniform(1.0, 1.5)
    return min(cap_s, 0.1 * float(2 ** (attempt - 1))) * random.uniform(0.5, 1.0)


def resend_delay(err: SheepdogError, resends: int, max_retries: int) -> float | None:
    """Seconds before sending a submit again, or None to raise `err`. Only a 409
    `idempotency_key_in_progress` is resent: the first submit with the same key is still being
    written, and the key makes sending again safe (it answers that submit's id once its row
    exists). Any other refusal, and any lost answer, is the caller's to decide."""
    if not isinstance(err, Conflict) or err.code != "idempotency_key_in_progress":
        return None
    if resends >= max_retries:
        return None
    after = err.retry_after
    return backoff(resends + 1, None if after is None else int(after * 1000))


class StreamState:
    """Where a followed stream stands: the last `seq` seen (what a reconnect resumes after),
    the text so far (a `reset` clears it) and the final event."""

    def __init__(self, request_id: str, last_event_id: int | None) -> None:
        self.request_id = request_id
        self.last_seq = last_event_id
        self.parts: list[str] = []
        self.final: Event | None = None
        self.reconnects = 0
        self.decoder = SSEDecoder()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def resume_headers(self) -> dict[str, str]:
        """Headers of the next connection (which starts a new event in the decoder)."""
        self.decoder.new_connection()
        out = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_seq is not None:
            out["Last-Event-ID"] = str(self.last_seq)
        return out

    def accept(self, sse: ServerSentEvent) -> Event | None:
        """The event to hand on, or None for one already seen. Raises `Gap` when the server
        skipped a `seq` (the caller reconnects from the last one it has)."""
        try:
            event = Event.model_validate_json(sse.data)
        except ValidationError as err:
            raise SheepdogError(f"unreadable event from the server: {sse.data!r:.200}") from err
        if self.last_seq is not None and event.seq <= self.last_seq:
            return None
        expected = 0 if self.last_seq is None else self.last_seq + 1
        if event.seq != expected:
            raise Gap(f"expected seq {expected}, got {event.seq}")
        self.last_seq = event.seq
        if event.type == "token" and event.text:
            self.parts.append(event.text)
        elif event.type == "reset":
            self.parts.clear()
        elif event.is_final:
            self.final = event
        return event


class Gap(Exception):
    """The server skipped a `seq`: reconnect from the last one seen."""


def list_params(
    status: str | None, since: datetime | str | None, cursor: str | None, limit: int | None
) -> dict[str, str]:
    params = {"status": status, "cursor": cursor}
    params["since"] = since.isoformat() if isinstance(since, datetime) else since
    params["limit"] = None if limit is None else str(limit)
    return {k: v for k, v in params.items() if v is not None}


def check_deadline(state: StreamState, deadline: float | None, timeout: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise WaitTimeout(f"request {state.request_id} has not ended after {timeout}s")


def reconnect_delay(
    failures: int, state: StreamState, cause: BaseException | None, deadline: float | None
) -> float:
    """Seconds to wait before the next connection: a 429's Retry-After, else `backoff`; never
    past the follow's deadline (the next check_deadline then raises WaitTimeout)."""
    if isinstance(cause, RateLimited) and cause.retry_after is not None:
        delay = float(cause.retry_after)
    else:
        delay = backoff(failures, state.decoder.retry_ms)
    if deadline is not None:
        delay = min(delay, max(0.0, deadline - time.monotonic()))
    return delay


def final_text(state: StreamState) -> str:
    """The text of a stream that has ended; `RequestFailed` when it ended in `error`."""
    final = state.final
    if final is None:
        raise SheepdogError(f"the event stream of {state.request_id} ended before the request")
    if final.type == "error":
        raise RequestFailed(final.error or "failed", request_id=state.request_id)
    return state.text
