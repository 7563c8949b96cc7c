"""What the front door does for a tenant, on top of the in-deployment client (sheepdog.client):
submit in its name, and read, list and cancel only its own requests. Blocking calls (the
handlers run them in a thread).

- The tenant is the key's: `metadata.tenant` is set from it, whatever the body said, so budgets
  apply to it. Idempotency keys are the tenant's own, stored under its scope
  (models/idempotency.py), so one tenant can neither learn another's request ids nor hold its
  keys.
- A request belongs to the tenant of its row. The producer writes the row before the ids go
  back (the default); with `producer_writes_rows` off a worker writes it later, and until then
  the request belongs to the tenant the front door wrote down when it submitted it (a Redis
  record, keys.request_owner), and reading it answers a `queued` view made from that record.
  Another tenant's request is not found.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson

from core import keys
from core.errors import BudgetExceeded, IdempotencyConflict, InvalidRequest, SheepdogError
from core.redis_conn import get_redis
from models.idempotency import KEY_MAX_CHARS, as_given, scope
from models.request import REQUEST_ID, Priority
from models.views import RequestView
from rules.admission import Admitted, admit
from sheepdog.client import Client

OWNER_TTL_S = 7 * 24 * 3600  # as long as an idempotency key lives


def scoped_key(tenant: str, key: str) -> str:
    if len(key) > KEY_MAX_CHARS:
        raise InvalidRequest(
            f"idempotency_key: at most {KEY_MAX_CHARS} characters, got {len(key):,}",
            "idempotency_key",
        )
    return scope(tenant) + key


def conflict_as_given(err: Exception, tenant: str) -> Exception:
    """An idempotency conflict names the key as the tenant gave it, not as stored."""
    if isinstance(err, IdempotencyConflict):
        given = as_given(tenant, err.key) or err.key
        return IdempotencyConflict(given, err.first_id, in_progress=err.in_progress)
    return err


def in_tenant(request: object, tenant: str) -> object:
    """The request as submitted for `tenant` (a copy; anything not an object is left for the
    validation to refuse)."""
    if not isinstance(request, dict):
        return request
    out = dict(request)
    metadata = out.get("metadata")
    if metadata is None or isinstance(metadata, dict):
        out["metadata"] = {**(metadata or {}), "tenant": tenant}
    key = out.get("idempotency_key")
    if isinstance(key, str) and key:
        out["idempotency_key"] = scoped_key(tenant, key)
    return out


def public(view: RequestView) -> dict[str, Any]:
    """The view as its tenant reads it (its idempotency key as it gave it)."""
    data = view.model_dump(mode="json")
    data["idempotency_key"] = as_given(view.tenant, view.idempotency_key)
    return data


class Tenancy:
    """The in-deployment client, seen by one tenant at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.settings = client.settings
        # Owner records exist only where the rows come later than the ids (see above).
        self._owner_records = not client.settings.producer_writes_rows

    def validate(self, tenant: str, requests: list[object], as_list: bool) -> list[Admitted]:
        """Each request as submitted for `tenant`, validated (no I/O); InvalidRequest names the
        bad item's index when the body was a list."""
        out = []
        for index, request in enumerate(requests):
            try:
                out.append(admit(in_tenant(request, tenant), prices=self.client.table))
            except InvalidRequest as err:
                raise err.in_list(index) if as_list else err from None
        return out

    def submit(self, tenant: str, requests: list[Admitted]) -> list[str]:
        """Enqueue validated requests of one tenant (all or nothing)."""
        return self.submit_calls([(tenant, requests)])[0]  # type: ignore[return-value]

    def submit_calls(
        self, calls: list[tuple[str, list[Admitted]]]
    ) -> list[list[str] | BaseException]:
        """Enqueue several calls' validated requests in one submit_many (a few large intake
        messages instead of one each); each call gets its ids or the error that refused it.
        A budget refusal (or any refusal of one call's requests) is not everyone's: then each
        call is submitted on its own. Redis or the database away fails them all."""
        flat = [request for _, requests in calls for request in requests]
        try:
            ids = self.client.submit_admitted(flat)
        except (InvalidRequest, BudgetExceeded) as err:
            if len(calls) == 1:
                return [conflict_as_given(err, calls[0][0])]
            return [self.submit_calls([call])[0] for call in calls]
        except SheepdogError as err:
            return [err for _ in calls]
        if self._owner_records:
            self._record_owners(calls, ids)
        out: list[list[str] | BaseException] = []
        start = 0
        for _, requests in calls:
            out.append(ids[start : start + len(requests)])
            start += len(requests)
        return out

    def _record_owners(self, calls: list[tuple[str, list[Admitted]]], ids: list[str]) -> None:
        now = datetime.now(UTC).isoformat()
        rids = iter(ids)
        with get_redis(self.settings.redis_url).pipeline(transaction=False) as pipe:
            for tenant, requests in calls:
                for admitted, rid in zip(requests, rids, strict=False):
                    request = admitted.request
                    record = {
                        "tenant": tenant,
                        "priority": request.priority.value,
                        "model": request.model,
                        "idempotency_key": request.idempotency_key,
                        "created_at": now,
                    }
                    pipe.set(
                        keys.of(self.settings).request_owner(rid),
                        orjson.dumps(record),
                        ex=OWNER_TTL_S,
                        nx=True,
                    )
            pipe.execute()

    def _pending(self, request_id: str) -> RequestView | None:
        raw = get_redis(self.settings.redis_url).get(
            keys.of(self.settings).request_owner(request_id)
        )
        if raw is None:
            return None
        rec = orjson.loads(raw)
        priority = Priority(rec["priority"])
        return RequestView(
            id=request_id,
            status="queued",
            priority=priority.value,
            route=priority.route,
            escalated=False,
            model=rec["model"],
            tenant=rec["tenant"],
            text=None,
            finish_reason=None,
            usage=None,
            cost_usd=None,
            error=None,
            attempts=0,
            batch_job_id=None,
            idempotency_key=rec.get("idempotency_key"),
            metadata={"tenant": rec["tenant"]},
            created_at=datetime.fromisoformat(rec["created_at"]),
            started_at=None,
            first_token_at=None,
            finished_at=None,
        )

    def get(self, tenant: str, request_id: str) -> RequestView | None:
        """The tenant's own request, or None (unknown and another tenant's alike)."""
        if not REQUEST_ID.match(request_id):  # no row can have it
            return None
        view = self.client.get(request_id)
        if view is None and self._owner_records:
            view = self._pending(request_id)
        if view is None or view.tenant != tenant:
            return None
        return view

    def statuses(self, asks: list[tuple[str, str]]) -> list[str | BaseException | None]:
        """For each (tenant, request id): the status of the tenant's own request, or None (as
        `get`, without reading the row's text: what following it needs). One query for all;
        the database away is every ask's error."""
        ids = {rid for _, rid in asks if REQUEST_ID.match(rid)}  # no row has another
        try:
            found = self.client.owners(sorted(ids)) if ids else {}
        except SheepdogError as err:
            return [err for _ in asks]
        out: list[str | BaseException | None] = []
        for tenant, rid in asks:
            owner = found.get(rid)
            if owner is None and self._owner_records and rid in ids:
                view = self._pending(rid)
                owner = (view.tenant, view.status) if view is not None else None
            out.append(owner[1] if owner is not None and owner[0] == tenant else None)
        return out

    def cancel(self, tenant: str, request_id: str) -> tuple[bool, str] | None:
        """(cancelled by this call, status after), or None when not the tenant's."""
        view = self.get(tenant, request_id)
        if view is None:
            return None
        if view.route == "batch" and view.attempts == 0 and view.started_at is None:
            self._wait_for_row(request_id)
        cancelled = self.client.cancel(request_id)
        after = self.get(tenant, request_id)
        status = after.status if after is not None else "cancelled"
        if cancelled and status == "queued":
            status = "cancelled"  # not yet recorded: the task will see the flag, never start
        return cancelled, status

    def _wait_for_row(self, request_id: str, wait_s: float = 2.0) -> None:
        # The cancel flag is read by stream tasks only: a low-priority request must have its
        # row (written by intake within milliseconds) for cancel_request to move it.
        deadline = time.monotonic() + wait_s
        while self.client.get(request_id) is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def list(
        self,
        tenant: str,
        status: str | None,
        since: datetime | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> list[RequestView]:
        return self.client.list_requests(
            tenant, status=status, since=since, before=before, limit=limit
        )
