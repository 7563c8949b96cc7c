"""The producer client: what a backend service imports to send work to Sheepdog.

from sheepdog.client import Client
client = Client()
rid = client.submit({"model": "gpt-4.1", "messages": [...], "priority": "high"})
for text in client.stream(rid): ...
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError as SQLOperationalError
from sqlalchemy.orm import Session, defer

from core.db import session_scope
from core.errors import (
    DATABASE_HINT,
    ServiceUnavailable,
    SheepdogError,
    redact_url,
)
from intake.submit import RequestLike, Submitter
from models.tables import Request
from models.views import RequestView

# A view's row is read without its deadline: not part of the view, and a caller's far-future
# deadline (year 10000 once in the database session's time zone) fails to load as a datetime.
VIEW_COLUMNS = (defer(Request.deadline),)


class Client(Submitter):
    """Submit requests (intake/submit.py), read them back, follow streams and cancel them."""

    # -- read back --------------------------------------------------------------------------

    def get(self, request_id: str) -> RequestView | None:
        """The request as stored, or None when no worker has recorded it yet."""
        query = select(Request).options(*VIEW_COLUMNS).where(Request.id == request_id)
        with self._reading(request_id) as session:
            row = session.scalar(query)
            return RequestView.from_row(row) if row is not None else None

    def owners(self, request_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """(tenant, status) of each stored request among `request_ids` (one query; an id not
        yet recorded is left out): what an ownership check needs, two columns instead of the
        row and its view."""
        query = select(Request.id, Request.tenant, Request.status).where(
            Request.id.in_(request_ids)
        )
        more = f" (and {len(request_ids) - 1} more)" if len(request_ids) > 1 else ""
        with self._reading(f"{request_ids[0]}{more}" if request_ids else "-") as session:
            return {rid: (tenant, status) for rid, tenant, status in session.execute(query)}

    @contextlib.contextmanager
    def _reading(self, request_id: str) -> Iterator[Session]:
        """A session reading one request's row; the database away is ServiceUnavailable, a row
        that cannot be read a SheepdogError saying so."""
        try:
            with session_scope(self.settings.database_url) as session:
                yield session
        except SQLOperationalError as err:
            raise ServiceUnavailable(
                "the database", redact_url(self.settings.database_url), DATABASE_HINT
            ) from err
        except (DBAPIError, ValueError, OverflowError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err)
            raise SheepdogError(
                f"request {request_id}: its stored row cannot be read ({first})"
            ) from None

    def list_requests(
        self,
        tenant: str,
        *,
        status: str | None = None,
        since: datetime | None = None,
        before: tuple[datetime, str] | None = None,
        limit: int = 50,
    ) -> list[RequestView]:
        """A tenant's requests, newest first (created_at, then id, descending): those created
        at or after `since`, strictly after the (created_at, id) `before` position."""
        stmt = select(Request).options(*VIEW_COLUMNS).where(Request.tenant == tenant)
        if status is not None:
            stmt = stmt.where(Request.status == status)
        if since is not None:
            stmt = stmt.where(Request.created_at >= since)
        if before is not None:
            at, rid = before
            stmt = stmt.where(
                (Request.created_at < at) | ((Request.created_at == at) & (Request.id < rid))
            )
        stmt = stmt.order_by(Request.created_at.desc(), Request.id.desc()).limit(limit)
        try:
            with session_scope(self.settings.database_url) as session:
                return [RequestView.from_row(row) for row in session.scalars(stmt)]
        except SQLOperationalError as err:
            raise ServiceUnavailable(
                "the database", redact_url(self.settings.database_url), DATABASE_HINT
            ) from err

    def result(self, request_id: str, wait: float = 0.0, poll_s: float = 0.25) -> RequestView:
        """The request once it has ended (succeeded, failed or cancelled), waiting up to `wait`
        seconds; raises TimeoutError when it has not ended by then."""
        deadline = time.monotonic() + wait
        delay = min(poll_s, 0.05)
        while True:
            view = self.get(request_id)
            if view is not None and view.is_final:
                return view
            if time.monotonic() >= deadline:
                state = view.status if view else "not yet recorded"
                raise TimeoutError(f"request {request_id} has not ended after {wait}s ({state})")
            time.sleep(delay)
            delay = min(delay * 2, poll_s)

    # -- streaming (see streaming/subscriber.py) --------------------------------------------

    def stream(self, request_id: str, timeout: float = 300.0) -> Iterator[str]:
        """Yield the answer's text as it arrives (replay log first, then live)."""
        from streaming.subscriber import stream_text

        return stream_text(request_id, timeout=timeout, settings=self.settings)

    def astream(self, request_id: str, timeout: float = 300.0) -> AsyncIterator[str]:
        """The asyncio twin of stream()."""
        from streaming.subscriber import astream_text

        return astream_text(request_id, timeout=timeout, settings=self.settings)

    def cancel(self, request_id: str) -> bool:
        """Cancel a request: a queued one never starts, an in-flight stream stops. False when
        it had already ended or is in a provider batch; InvalidRequest for something that is
        not a request id."""
        from streaming.cancel import cancel_request

        return cancel_request(request_id, settings=self.settings)

    def cancel_outcome(self, request_id: str) -> str:
        """Cancel a request and say what that did: `cancelled`, `already ended`, `in a batch`
        (a provider has it: it ends with the batch's answer) or `not recorded` (an unknown id,
        or one still in the queue, which then never starts)."""
        from streaming.cancel import cancel_outcome

        return cancel_outcome(request_id, settings=self.settings).value


_default: Client | None = None


def default_client() -> Client:
    global _default
    if _default is None:
        _default = Client()
    return _default


def submit(request: RequestLike) -> str:
    """Submit with the default client."""
    return default_client().submit(request)


def submit_many(requests: Iterable[RequestLike]) -> list[str]:
    """Submit many with the default client."""
    return default_client().submit_many(requests)


def get(request_id: str) -> RequestView | None:
    """Read back with the default client."""
    return default_client().get(request_id)
