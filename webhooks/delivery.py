"""Delivering the outbox: lease due rows, sign and POST each, record the outcomes.

At least once: a row stays `pending` until a 2xx is recorded; a worker killed mid-delivery
leaves a lease that expires, and the row is sent again with the same webhook-id. Failures
(timeouts, connection errors, non-2xx, a 3xx since redirects are not followed) back off
exponentially with jitter until the row's `expires_at` (webhook_max_age_s), then it is `dead`
(`sheepdog webhooks failed`). `410 Gone` disables the endpoint. A run holds one of its
endpoint's slots and one of its tenant's (webhooks/slots.py), and each attempt is bounded by
short timeouts, so a slow receiver holds at most its own slots, and a tenant's many slow
receivers at most the tenant's, never another tenant's.

A slot leases its endpoint's rows a few at a time (1, doubling while they succeed, up to
webhook_claim_batch) and records them in one transaction: a database round trip costs more
than a local POST, and a slow receiver still gets one row at a time."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.client import HTTPException
from typing import Any, Literal

import orjson
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from core.db import is_postgres, session_scope
from core.settings import Settings
from models.idempotency import as_given
from models.tables import Request, storable, utcnow
from models.views import RequestView
from models.webhook_tables import WebhookDelivery, WebhookEndpoint, WebhookSecret
from rules.addresses import UnsafeURL
from rules.backoff import backoff_s
from webhooks import crypto, slots
from webhooks.outbox import REQUEST_TARGET, envelope
from webhooks.sender import post
from webhooks.signing import signed_headers

log = logging.getLogger("sheepdog.webhooks.delivery")

URL_TARGET = "url:"  # a due_targets name for the deliveries to one request-level URL
MAX_PER_RUN = 500  # deliveries one task sends to its endpoint before yielding the thread


@dataclass
class Claimed:
    id: int
    webhook_id: str
    url: str
    body: bytes
    secrets: list[str]


# delivered: a 2xx; retry: send again later; dead: never again; gone: a 410 (endpoint disabled)
SendKind = Literal["delivered", "retry", "dead", "gone"]


@dataclass
class SendResult:
    """What one POST of a delivery came to."""

    kind: SendKind
    error: str | None = None
    status_code: int | None = None

    def __post_init__(self) -> None:
        # A receiver's answer (or an exception naming its bytes) may carry a NUL, which
        # PostgreSQL's text refuses: the batch's record then rolled back, every time, and its
        # rows were sent again without end.
        if self.error is not None:
            self.error = storable(self.error)


@dataclass
class TargetReport:
    target: str
    busy: bool = False  # every slot of the tenant's, or of the endpoint's, is taken
    delivered: int = 0
    failed: int = 0
    dead: int = 0


def lease_s(settings: Settings, rows: int = 1) -> float:
    """How long `rows` claimed rows are held: longer than sending them all can take."""
    return rows * 4 * settings.webhook_timeout_s + 10


def retry_delay_s(settings: Settings, attempts: int) -> float:
    """The wait before a failed delivery is sent again."""
    return backoff_s(attempts, settings.webhook_backoff_base_s, settings.webhook_backoff_max_s)


def _due(now: datetime) -> list[Any]:
    d = WebhookDelivery
    return [
        d.status == "pending",
        d.next_attempt_at <= now,
        or_(d.leased_until.is_(None), d.leased_until < now),
    ]


def due_targets(settings: Settings, limit: int = 500) -> list[tuple[str, str]]:
    """(target, tenant) pairs with a due, unleased delivery: targets are endpoint ids, and
    `url:<url>` for requests' own URLs (so one URL named by many requests still gets its few
    slots, not one each); the tenant's slots bound a run too."""
    d = WebhookDelivery
    # One row a target (the oldest due first): a backlog of one endpoint's deliveries must not
    # fill the list, or every other tenant's wait behind it with the workers idle.
    oldest = func.min(d.next_attempt_at)
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(d.target, d.url, d.tenant)
            .where(*_due(utcnow()))
            .group_by(d.target, d.url, d.tenant)
            .order_by(oldest)
            .limit(limit * 4)
        ).all()
    targets: dict[tuple[str, str], None] = {}  # in order, once each
    for target, url, tenant in rows:
        name = f"{URL_TARGET}{url}" if target == REQUEST_TARGET else target
        targets[(name, tenant)] = None
    return list(targets)[:limit]


def deliver_target(settings: Settings, target: str, tenant: str | None = None) -> TargetReport:
    """Send the target's due deliveries (of `tenant`, when given) while it answers 2xx, holding
    one of the tenant's slots and one of the target's; stop at the first failure (the rest
    wait for their own retry time)."""
    report = TargetReport(target)
    held = slots.take(settings, target, tenant, lease_s(settings, 1))
    if held is None:
        report.busy = True
        return report
    batch = 1
    try:
        while report.delivered + report.failed + report.dead < MAX_PER_RUN:
            claimed = claim(settings, target, batch, tenant)
            if not claimed:
                break
            results: list[tuple[Claimed, SendResult]] = []
            for item in claimed:
                if not held.renew():  # expired (this process stalled): another may hold them
                    break
                outcome = send(settings, item)
                results.append((item, outcome))
                if outcome.kind not in ("delivered", "dead"):
                    break
            record(settings, results, [c.id for c in claimed[len(results) :]])
            for _, outcome in results:
                if outcome.kind == "delivered":
                    report.delivered += 1
                elif outcome.kind in ("dead", "gone"):
                    report.dead += 1
                else:
                    report.failed += 1
            if len(results) < len(claimed) or results[-1][1].kind not in ("delivered", "dead"):
                break  # a failure, or the slot lost: the rest wait for their own time
            batch = min(batch * 2, max(1, settings.webhook_claim_batch))
    finally:
        held.release()
    return report


def claim(
    settings: Settings, target: str, limit: int = 1, tenant: str | None = None
) -> list[Claimed]:
    """Lease up to `limit` of the target's due rows (of `tenant`, when given), oldest first,
    and prepare their bodies and secrets. Rows that cannot be sent (endpoint disabled or gone,
    no secret) are marked dead here; the deployment's key missing leaves them pending."""
    d = WebhookDelivery
    now = utcnow()
    with session_scope(settings.database_url) as session:
        pick = select(d.id).where(*_due(now))
        if tenant is not None:
            pick = pick.where(d.tenant == tenant)
        if target.startswith(URL_TARGET):
            pick = pick.where(d.target == REQUEST_TARGET, d.url == target[len(URL_TARGET) :])
        else:
            pick = pick.where(d.target == target)
        pick = pick.order_by(d.next_attempt_at, d.id).limit(limit)
        if is_postgres(session):
            pick = pick.with_for_update(skip_locked=True)
        # The ids first, then the lease (two statements): PostgreSQL may run a limited subquery
        # of `IN (...)` once per row of the UPDATE, skipping the rows it has just leased, so
        # one statement leased every due row whatever the limit.
        picked = list(session.scalars(pick))
        if not picked:
            return []
        ids = session.scalars(
            update(d)
            .where(d.id.in_(picked), *_due(now))
            .values(leased_until=now + timedelta(seconds=lease_s(settings, limit)))
            .returning(d.id)
            .execution_options(synchronize_session=False)
        ).all()
        if not ids:
            return []
        rows = list(
            session.scalars(select(d).where(d.id.in_(ids)).order_by(d.next_attempt_at, d.id))
        )
        problem, url = _destination(session, rows[0])  # one endpoint, or one URL
        if problem is not None or url is None:
            _settle(session, settings, [(r, SendResult("dead", problem)) for r in rows])
            return []
        try:  # a request-level URL may be named by several tenants: each signs its own
            secrets = {
                t: signing_secrets(session, settings, t, now) for t in {r.tenant for r in rows}
            }
        except crypto.WebhookKeyError as err:
            _settle(session, settings, [(r, SendResult("retry", str(err))) for r in rows])
            return []
        unsigned = [r for r in rows if not secrets[r.tenant]]
        _settle(
            session,
            settings,
            [
                (
                    r,
                    SendResult(
                        "dead",
                        f"tenant {r.tenant!r} has no webhook signing secret "
                        "(sheepdog webhooks rotate-secret creates one; then redeliver)",
                    ),
                )
                for r in unsigned
            ],
        )
        rows = [r for r in rows if secrets[r.tenant]]
        _render(session, [r for r in rows if r.payload is None])
        return [
            Claimed(r.id, r.webhook_id, url, orjson.dumps(r.payload), secrets[r.tenant])
            for r in rows
        ]


def _destination(session: Session, row: WebhookDelivery) -> tuple[str | None, str | None]:
    if row.target == REQUEST_TARGET:
        return (None, row.url) if row.url else ("the request has no webhook_url", None)
    endpoint = session.get(WebhookEndpoint, row.endpoint_id) if row.endpoint_id else None
    if endpoint is None:
        return "the endpoint was removed", None
    if not endpoint.enabled:
        return f"the endpoint is disabled: {endpoint.disabled_reason or 'by an operator'}", None
    return None, endpoint.url


def signing_secrets(session: Session, settings: Settings, tenant: str, now: datetime) -> list[str]:
    """The tenant's current secret, and the previous one during its grace period."""
    row = session.get(WebhookSecret, tenant)
    if row is None:
        return []
    secrets = [crypto.decrypt(settings, row.secret)]
    if row.previous and row.previous_until and row.previous_until > now:
        secrets.append(crypto.decrypt(settings, row.previous))
    return secrets


def _render(session: Session, rows: list[WebhookDelivery]) -> None:
    """Request events' bodies, from the requests' final rows (stored: every retry sends the
    same bytes)."""
    if not rows:
        return
    found = {
        r.id: r
        for r in session.scalars(
            select(Request).where(Request.id.in_([x.subject_id for x in rows]))
        )
    }
    for row in rows:
        request = found.get(row.subject_id)
        if request is None:  # purged since it ended
            data: dict[str, Any] = {"id": row.subject_id, "status": row.event_type.split(".", 1)[1]}
            row.payload = envelope(row.event_type, data, row.created_at.isoformat())
            continue
        view = RequestView.from_row(request).model_dump(mode="json")
        view["idempotency_key"] = as_given(request.tenant, request.idempotency_key)
        row.payload = envelope(
            row.event_type, view, (request.finished_at or row.created_at).isoformat()
        )


def send(settings: Settings, claimed: Claimed) -> SendResult:
    """POST one claimed delivery, signed now; what happened (nothing recorded yet)."""
    headers = signed_headers(claimed.secrets, claimed.webhook_id, int(time.time()), claimed.body)
    try:
        response = post(
            claimed.url,
            claimed.body,
            headers,
            timeout_s=settings.webhook_timeout_s,
            allow_private=settings.webhook_allow_private,
            max_response_bytes=settings.webhook_max_response_bytes,
        )
    except UnsafeURL as err:
        return SendResult("dead", str(err))
    except (OSError, HTTPException) as err:  # TimeoutError and HostNotFound are OSErrors
        return SendResult("retry", f"{type(err).__name__}: {err}"[:500])
    except ValueError as err:  # a URL no request can carry (stored before it was refused)
        return SendResult("dead", f"{type(err).__name__}: {err}"[:500])
    status = response.status
    if 200 <= status < 300:
        return SendResult("delivered", status_code=status)
    text = response.body[:200].decode("utf-8", "replace").replace("\n", " ")
    error = f"HTTP {status}" + (f": {text}" if text else "")
    return SendResult("gone" if status == 410 else "retry", error, status)


def record(
    settings: Settings, results: list[tuple[Claimed, SendResult]], unsent: list[int]
) -> None:
    """Record a batch's outcomes in one transaction, and free the rows not sent."""
    d = WebhookDelivery
    with session_scope(settings.database_url) as session:
        ids = [c.id for c, _ in results]
        rows = {
            r.id: r for r in session.scalars(select(d).where(d.id.in_(ids), d.status == "pending"))
        }
        _settle(session, settings, [(rows[c.id], o) for c, o in results if c.id in rows])
        if unsent:
            session.execute(
                update(d)
                .where(d.id.in_(unsent), d.status == "pending")
                .values(leased_until=None)
                .execution_options(synchronize_session=False)
            )


def _settle(
    session: Session, settings: Settings, outcomes: list[tuple[WebhookDelivery, SendResult]]
) -> None:
    now = utcnow()
    delivered = [r.id for r, o in outcomes if o.kind == "delivered"]
    if delivered:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(delivered))
            .values(
                status="delivered",
                delivered_at=now,
                attempts=WebhookDelivery.attempts + 1,
                leased_until=None,
                last_error=None,
                last_status_code=next(o.status_code for _, o in outcomes if o.kind == "delivered"),
            )
            .execution_options(synchronize_session=False)
        )
    for row, outcome in outcomes:
        if outcome.kind == "delivered":
            continue
        attempts = row.attempts + (
            0 if outcome.status_code is None and outcome.kind == "dead" else 1
        )
        values: dict[str, Any] = {
            "attempts": attempts,
            "leased_until": None,
            "last_error": outcome.error,
            "last_status_code": outcome.status_code,
        }
        if outcome.kind == "gone":
            if row.endpoint_id is not None:
                session.execute(
                    update(WebhookEndpoint)
                    .where(WebhookEndpoint.id == row.endpoint_id)
                    .values(
                        enabled=False,
                        disabled_reason=f"answered 410 Gone at {now:%Y-%m-%d %H:%M:%S} UTC",
                    )
                )
            values.update(status="dead", last_error=f"{outcome.error} (endpoint disabled)")
        elif outcome.kind == "dead":
            values["status"] = "dead"
        else:
            when = now + timedelta(seconds=retry_delay_s(settings, attempts))
            if when > row.expires_at:
                values.update(
                    status="dead", last_error=f"{outcome.error} (gave up after {attempts} attempts)"
                )
            else:
                values["next_attempt_at"] = when
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == row.id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
