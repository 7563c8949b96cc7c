"""The outbox: delivery rows written in the transaction that ends a request or a batch job.

The lifecycle (lifecycle/moves.py) calls `request_ended` after every move to an end status,
the batch ingest calls it after its bulk moves and `batch_ended` when it marks a job ingested.
Each is set-based (one INSERT ... SELECT per target kind) and first asks which tenants use
webhooks at all (a tiny table): with none, nothing more runs. A row is unique by (subject,
event, target), so writing the same end twice adds nothing.

A request event's payload is left null here: the row it describes is final and no longer
changes, so the first delivery attempt renders it (models/views.py RequestView) and stores it;
copying every answer's text into the outbox would double what a batch ingest writes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Text,
    and_,
    cast,
    event,
    func,
    literal,
    or_,
    select,
    true,
)
from sqlalchemy.orm import Session

from core.db import among, dialect_insert, is_postgres
from core.settings import get_settings
from models.status import FINAL, Status
from models.tables import Request, UTCDateTime, utcnow
from models.webhook_tables import WebhookDelivery, WebhookEndpoint, WebhookSecret

log = logging.getLogger("sheepdog.webhooks")

REQUEST_EVENTS = ("request.succeeded", "request.failed", "request.cancelled")
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.expired")
EVENTS = REQUEST_EVENTS + BATCH_EVENTS
# Sheepdog cancels a provider batch only when it stays open past batch_max_wait_s: an expiry.
BATCH_EVENT_OF = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "expired": "batch.expired",
    "cancelled": "batch.expired",
}
# A request's final statuses in the order a batch event counts them (succeeded, failed, ...).
ENDED = tuple(s.value for s in Status if s in FINAL)
REQUEST_TARGET = "request"  # `target` of a delivery to the request's own webhook_url
COLUMNS = (
    "webhook_id",
    "tenant",
    "target",
    "endpoint_id",
    "url",
    "event_type",
    "subject_id",
    "status",
    "attempts",
    "next_attempt_at",
    "expires_at",
    "created_at",
)

_kick: Callable[[], None] | None = None


def set_kicker(kick: Callable[[], None] | None) -> None:
    """What to call after a commit that wrote deliveries (the Celery face installs a sweep
    request on worker start). Without one, beat's sweep finds them."""
    global _kick
    _kick = kick


def hooked_tenants_select() -> Select[tuple[str]]:
    """Tenants that may receive events: every tenant with an endpoint or a request-level URL
    has a signing secret (adding an endpoint creates it)."""
    return select(WebhookSecret.tenant)


def hooked_tenants(session: Session) -> list[str]:
    """The tenants of `hooked_tenants_select`."""
    return list(session.scalars(hooked_tenants_select()))


def subscribed(events: Any, event_type: Any) -> ColumnElement[bool]:
    return or_(events == "*", events.like(literal("%,") + event_type + literal(",%")))


def _new_id(session: Session) -> Any:
    if is_postgres(session):
        return literal("msg_") + func.replace(cast(func.gen_random_uuid(), Text), "-", "")
    return literal("msg_") + func.lower(func.hex(func.randomblob(16)))


def _insert(session: Session) -> Any:
    return dialect_insert(session, WebhookDelivery)


def _write(session: Session, rows: Any) -> int:
    stmt = _insert(session).from_select(COLUMNS, rows).on_conflict_do_nothing()
    written = int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]
    if written:
        _kick_after_commit(session)
    return written


def request_ended(
    session: Session,
    request_ids: Sequence[str],
    status: str,
    tenants: Sequence[str] | None = None,
) -> int:
    """Write the deliveries of the requests among `request_ids` that are now `status` (an end
    status): one per subscribed endpoint of their tenant, one to the request's own URL.
    `tenants`: the hooked tenants when the caller read them already (else they are read).
    Returns rows written."""
    if not request_ids:
        return 0
    tenants = hooked_tenants(session) if tenants is None else list(tenants)
    if not tenants:
        return 0
    event_type = f"request.{status}"
    now = utcnow()
    expires = now + timedelta(seconds=get_settings().webhook_max_age_s)
    req = Request.__table__.c
    ep = WebhookEndpoint.__table__.c
    ids = list(request_ids)
    chunk = 5000  # bounded parameter lists on SQLite
    written = 0
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        base = and_(
            among(session, req.id, part),
            req.status == status,
            req.tenant.in_(tenants),
        )
        common = (
            literal(event_type),
            req.id,
            literal("pending"),
            literal(0),
            literal(now, UTCDateTime()),
        )
        to_endpoints = (
            select(
                _new_id(session),
                req.tenant,
                ep.id,
                ep.id,
                literal(None),
                *common,
                literal(expires, UTCDateTime()),
                literal(now, UTCDateTime()),
            )
            .select_from(Request.__table__.join(WebhookEndpoint.__table__, ep.tenant == req.tenant))
            .where(base, ep.enabled == true(), subscribed(ep.events, literal(event_type)))
        )
        to_own_url = select(
            _new_id(session),
            req.tenant,
            literal(REQUEST_TARGET),
            literal(None),
            req.webhook_url,
            *common,
            literal(expires, UTCDateTime()),
            literal(now, UTCDateTime()),
        ).where(base, req.webhook_url.is_not(None))
        written += _write(session, to_endpoints) + _write(session, to_own_url)
    return written


def batch_ended(session: Session, job_id: str, job_status: str) -> int:
    """Write a batch event per tenant of the job with a subscribed endpoint: the counts, cost
    and ids of its requests that ended in this job. Returns rows written."""
    event_type = BATCH_EVENT_OF.get(job_status)
    if event_type is None:
        return 0
    ep = WebhookEndpoint.__table__.c
    endpoints = session.execute(
        select(ep.id, ep.tenant).where(
            ep.enabled == true(), subscribed(ep.events, literal(event_type))
        )
    ).all()
    if not endpoints:
        return 0
    req = Request.__table__.c
    # No index serves "ended rows of a job" (the job index holds batched rows only): a scan,
    # paid only when some tenant listens for batch events.
    rows = session.execute(
        select(req.id, req.tenant, req.status, req.cost_usd).where(
            req.batch_job_id == job_id,
            req.status.in_(ENDED),
            req.tenant.in_({t for _, t in endpoints}),
        )
    ).all()
    per_tenant: dict[str, dict[str, Any]] = {}
    for rid, tenant, status, cost in rows:
        summary = per_tenant.setdefault(tenant, {**{s: [] for s in ENDED}, "cost": Decimal(0)})
        summary[status].append(rid)
        summary["cost"] += cost or Decimal(0)
    now = utcnow()
    expires = now + timedelta(seconds=get_settings().webhook_max_age_s)
    values = []
    from webhooks.signing import new_webhook_id

    for endpoint_id, tenant in endpoints:
        ended = per_tenant.get(tenant)
        if ended is None:
            continue  # the tenant had no request in this job
        data = {
            "id": job_id,
            "status": job_status,
            "tenant": tenant,
            "counts": {k: len(ended[k]) for k in ENDED},
            "cost_usd": format(ended["cost"].normalize(), "f"),
            "succeeded_ids": sorted(ended["succeeded"]),
            "failed_ids": sorted(ended["failed"] + ended["cancelled"]),
        }
        values.append(
            {
                "webhook_id": new_webhook_id(),
                "tenant": tenant,
                "target": endpoint_id,
                "endpoint_id": endpoint_id,
                "event_type": event_type,
                "subject_id": job_id,
                "payload": envelope(event_type, data, now.isoformat()),
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "expires_at": expires,
                "created_at": now,
            }
        )
    if not values:
        return 0
    stmt = _insert(session).values(values).on_conflict_do_nothing()
    written = int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]
    if written:
        _kick_after_commit(session)
    return written


def envelope(event_type: str, data: dict[str, Any], timestamp: str) -> dict[str, Any]:
    """The body every webhook carries (the Standard Webhooks payload shape)."""
    return {"type": event_type, "timestamp": timestamp, "data": data}


def _kick_after_commit(session: Session) -> None:
    if _kick is None or session.info.get("webhook_kick"):
        return
    session.info["webhook_kick"] = True
    event.listen(session, "after_commit", _after_commit, once=True)


def _after_commit(session: Session) -> None:
    session.info.pop("webhook_kick", None)
    if _kick is None:
        return
    try:
        _kick()
    except Exception:  # a lost kick only costs latency: beat's sweep finds the rows
        log.warning("webhook delivery kick failed; beat's sweep will deliver", exc_info=True)
