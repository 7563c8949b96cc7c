"""Delivering the outbox: claim a due row (a lease), sign and POST it, record the outcome.

At least once: a row stays `pending` until a 2xx is recorded; a worker killed mid-delivery
leaves a lease that expires, and the row is sent again with the same webhook-id. Failures
(timeouts, connection errors, non-2xx, a 3xx since redirects are not followed) back off
exponentially with jitter until the row's `expires_at` (webhook_max_age_s), then it is `dead`
(`sheepdog webhooks failed`). `410 Gone` disables the endpoint. Each endpoint has a few
delivery slots (Redis locks with a TTL) shared by every worker, and each attempt is bounded by
short timeouts, so one slow receiver holds at most its own slots, never another tenant's."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.client import HTTPException
from typing import Any

import orjson
import redis
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from models.tables import Request, utcnow
from models.webhook_tables import WebhookDelivery, WebhookEndpoint, WebhookSecret
from sheepdog import keys
from sheepdog.db import session_scope
from sheepdog.settings import Settings
from sheepdog.views import RequestView
from webhooks import crypto
from webhooks.addresses import UnsafeURL
from webhooks.outbox import REQUEST_TARGET, envelope
from webhooks.sender import post
from webhooks.signing import signed_headers

log = logging.getLogger("sheepdog.webhooks.delivery")

MAX_PER_RUN = 200  # deliveries one task sends to its endpoint before yielding the thread


@dataclass
class Claimed:
    id: int
    webhook_id: str
    url: str
    body: bytes
    secrets: list[str]


@dataclass
class TargetReport:
    target: str
    busy: bool = False  # every slot of the endpoint is taken
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    outcomes: list[str] = field(default_factory=list)


def lease_s(settings: Settings) -> float:
    """How long a claimed row is held: longer than any one attempt can take."""
    return 3 * settings.webhook_timeout_s + 10


def backoff_s(settings: Settings, attempts: int) -> float:
    """Exponential, capped, with jitter (half fixed, half random) so retries spread out."""
    ceiling = min(
        settings.webhook_backoff_max_s, settings.webhook_backoff_base_s * 2 ** (attempts - 1)
    )
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def due_targets(settings: Settings, limit: int = 500) -> list[str]:
    """Targets (endpoint ids, or `request:<id>`) with a due, unleased delivery."""
    now = utcnow()
    d = WebhookDelivery
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(d.target, d.id)
            .where(
                d.status == "pending",
                d.next_attempt_at <= now,
                or_(d.leased_until.is_(None), d.leased_until < now),
            )
            .order_by(d.next_attempt_at)
            .limit(limit * 4)
        ).all()
    targets: list[str] = []
    for target, delivery_id in rows:
        name = f"{REQUEST_TARGET}:{delivery_id}" if target == REQUEST_TARGET else target
        if name not in targets:
            targets.append(name)
    return targets[:limit]


def deliver_target(settings: Settings, target: str) -> TargetReport:
    """Send the target's due deliveries one after another while it answers 2xx, holding one
    of its slots; stop at the first failure (the rest wait for their own retry time)."""
    report = TargetReport(target)
    slot = _take_slot(settings, target)
    if slot is None:
        report.busy = True
        return report
    try:
        for _ in range(MAX_PER_RUN):
            claimed = claim(settings, target)
            if claimed is None:
                break
            outcome = attempt(settings, claimed)
            report.outcomes.append(outcome)
            if outcome == "delivered":
                report.delivered += 1
            elif outcome == "dead":
                report.dead += 1
            else:
                report.failed += 1
                break
            try:
                slot.reacquire()
            except redis.exceptions.LockError:
                break
    finally:
        with contextlib.suppress(redis.exceptions.LockError):  # expired: maybe retaken
            slot.release()
    return report


def _take_slot(settings: Settings, target: str) -> Any:
    from sheepdog.redis_conn import get_redis

    client = get_redis(settings.redis_url)
    for n in range(max(1, settings.webhook_endpoint_concurrency)):
        lock = client.lock(
            keys.webhook_slot(target, n, settings.broker_prefix), timeout=lease_s(settings)
        )
        if lock.acquire(blocking=False):
            return lock
    return None


def claim(settings: Settings, target: str) -> Claimed | None:
    """Lease the target's oldest due row and prepare its body and secrets; None when none.
    A row that cannot be sent (endpoint disabled or gone, no secret) is marked dead here."""
    d = WebhookDelivery
    now = utcnow()
    single: int | None = None
    if target.startswith(REQUEST_TARGET + ":"):
        single = int(target.split(":", 1)[1])
    with session_scope(settings.database_url) as session:
        while True:
            query = select(d.id).where(
                d.status == "pending",
                d.next_attempt_at <= now,
                or_(d.leased_until.is_(None), d.leased_until < now),
            )
            query = (
                query.where(d.id == single)
                if single is not None
                else query.where(d.target == target)
            )
            delivery_id = session.scalar(query.order_by(d.next_attempt_at, d.id).limit(1))
            if delivery_id is None:
                return None
            took = session.execute(
                update(d)
                .where(
                    d.id == delivery_id,
                    d.status == "pending",
                    or_(d.leased_until.is_(None), d.leased_until < now),
                )
                .values(
                    leased_until=now + timedelta(seconds=lease_s(settings)),
                    attempts=d.attempts + 1,
                )
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if took != 1:
                continue  # another worker took it first
            row = session.get(d, delivery_id)
            assert row is not None
            problem, url = _destination(session, row)
            try:
                secrets = signing_secrets(session, settings, row.tenant, now)
            except crypto.WebhookKeyError as err:  # the deployment's key: keep the row
                _retry(session, settings, row, str(err), None)
                return None
            if problem is None and not secrets:
                problem = (
                    f"tenant {row.tenant!r} has no webhook signing secret "
                    "(sheepdog webhooks rotate-secret creates one; then redeliver)"
                )
            if problem is not None:
                _mark(session, row.id, status="dead", last_error=problem)
                session.commit()
                if single is not None:
                    return None
                continue
            if row.payload is None:
                row.payload = _render(session, row)
            body = orjson.dumps(row.payload)
            session.commit()
            assert url is not None
            return Claimed(row.id, row.webhook_id, url, body, secrets)


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


def _render(session: Session, row: WebhookDelivery) -> dict[str, Any]:
    """A request event's body, from the request's final row."""
    request = session.get(Request, row.subject_id)
    if request is None:  # purged since it ended
        data: dict[str, Any] = {"id": row.subject_id, "status": row.event_type.split(".", 1)[1]}
        return envelope(row.event_type, data, row.created_at.isoformat())
    view = RequestView.from_row(request)
    when = request.finished_at or row.created_at
    return envelope(row.event_type, view.model_dump(mode="json"), when.isoformat())


def attempt(settings: Settings, claimed: Claimed) -> str:
    """POST one claimed delivery and record what happened: delivered, retry, dead or
    disabled (410)."""
    headers = signed_headers(claimed.secrets, claimed.webhook_id, int(time.time()), claimed.body)
    status: int | None = None
    try:
        response = post(
            claimed.url,
            claimed.body,
            headers,
            timeout_s=settings.webhook_timeout_s,
            allow_private=settings.webhook_allow_private,
            max_response_bytes=settings.webhook_max_response_bytes,
        )
        status = response.status
        error = None if 200 <= status < 300 else _answer(status, response.body)
    except UnsafeURL as err:
        return _record(settings, claimed.id, dead=str(err))
    except (OSError, HTTPException) as err:  # TimeoutError and HostNotFound are OSErrors
        error = f"{type(err).__name__}: {err}"[:500]
    if error is None:
        return _record(settings, claimed.id, delivered=True, status_code=status)
    if status == 410:
        return _record(settings, claimed.id, gone=error, status_code=status)
    return _record(settings, claimed.id, retry=error, status_code=status)


def _answer(status: int, body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").replace("\n", " ")
    return f"HTTP {status}" + (f": {text}" if text else "")


def _record(
    settings: Settings,
    delivery_id: int,
    *,
    delivered: bool = False,
    retry: str | None = None,
    dead: str | None = None,
    gone: str | None = None,
    status_code: int | None = None,
) -> str:
    with session_scope(settings.database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        if row is None or row.status != "pending":
            return "gone"
        if delivered:
            _mark(
                session,
                delivery_id,
                status="delivered",
                delivered_at=utcnow(),
                last_error=None,
                last_status_code=status_code,
            )
            return "delivered"
        if gone is not None:
            if row.endpoint_id is not None:
                session.execute(
                    update(WebhookEndpoint)
                    .where(WebhookEndpoint.id == row.endpoint_id)
                    .values(
                        enabled=False,
                        disabled_reason=f"answered 410 Gone at {utcnow():%Y-%m-%d %H:%M:%S} UTC",
                    )
                )
            _mark(
                session,
                delivery_id,
                status="dead",
                last_error=f"{gone} (endpoint disabled)",
                last_status_code=status_code,
            )
            return "dead"
        if dead is not None:
            _mark(
                session, delivery_id, status="dead", last_error=dead, last_status_code=status_code
            )
            return "dead"
        return _retry(session, settings, row, retry or "failed", status_code)


def _retry(
    session: Session, settings: Settings, row: WebhookDelivery, error: str, status_code: int | None
) -> str:
    when = utcnow() + timedelta(seconds=backoff_s(settings, max(row.attempts, 1)))
    if when > row.expires_at:
        _mark(
            session,
            row.id,
            status="dead",
            last_error=f"{error} (gave up after {row.attempts} attempts)",
            last_status_code=status_code,
        )
        return "dead"
    _mark(session, row.id, next_attempt_at=when, last_error=error, last_status_code=status_code)
    return "retry"


def _mark(session: Session, delivery_id: int, **values: Any) -> None:
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(leased_until=None, **values)
        .execution_options(synchronize_session=False)
    )
