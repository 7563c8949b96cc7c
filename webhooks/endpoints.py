"""Managing a tenant's webhooks: endpoints, its signing secret, failed deliveries.

Every function is tenant-scoped: the CLI passes the operator's `--tenant`, the HTTP API the
tenant of the caller's key. `tenant=None` (operators only) means every tenant. Another
tenant's endpoint or delivery is treated as unknown."""

from __future__ import annotations

import re
import secrets as _random
from collections.abc import Sequence
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.db import dialect_insert
from core.errors import InvalidRequest, SheepdogError
from core.settings import Settings
from models.intake_message import IntakeItem
from models.request import check_tenant
from models.tables import INTEGER_MAX, utcnow
from models.webhook_tables import WebhookDelivery, WebhookEndpoint, WebhookSecret
from rules.addresses import HostNotFound, UnsafeURL, check_form, resolve
from webhooks import crypto
from webhooks.outbox import EVENTS
from webhooks.signing import new_secret


class WebhookError(SheepdogError, ValueError):
    """A webhook command refused (bad URL, unknown event, unknown id)."""


class EndpointView(BaseModel):
    id: str
    tenant: str
    url: str
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: WebhookEndpoint) -> EndpointView:
        events = ["*"] if row.events == "*" else [e for e in row.events.split(",") if e]
        return cls(
            id=row.id,
            tenant=row.tenant,
            url=row.url,
            events=events,
            enabled=row.enabled,
            disabled_reason=row.disabled_reason,
            created_at=row.created_at,
        )


class DeliveryView(BaseModel):
    id: int
    webhook_id: str
    tenant: str
    target: str
    event_type: str
    subject_id: str
    status: str
    attempts: int
    last_error: str | None
    last_status_code: int | None
    created_at: datetime
    next_attempt_at: datetime

    @classmethod
    def from_row(cls, row: WebhookDelivery) -> DeliveryView:
        return cls.model_validate(row, from_attributes=True)


class Added(BaseModel):
    endpoint: EndpointView
    secret: str | None  # the tenant's new signing secret, shown once; None: it had one


def events_column(events: list[str] | None) -> str:
    """The endpoint's `events` column: `*` for all (None, or `["*"]`)."""
    if events is None or events == ["*"]:
        return "*"
    if not events:  # an empty list is a mistake, not a wish for every event
        raise WebhookError(
            f"events is empty: name one or more ({', '.join(EVENTS)}), or leave it out for all"
        )
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        shown = ", ".join(repr(e[:40]) for e in unknown[:5])
        more = f" and {len(unknown) - 5:,} more" if len(unknown) > 5 else ""
        raise WebhookError(f"unknown event(s) {shown}{more}; known: {', '.join(EVENTS)}")
    return "," + ",".join(sorted(set(events))) + ","


def check_url(settings: Settings, url: str) -> None:
    """A registration's check: form, and every address the host resolves to now."""
    try:
        check_form(url, allow_private=settings.webhook_allow_private)
        resolve(url, allow_private=settings.webhook_allow_private)
    except (UnsafeURL, HostNotFound) as err:
        raise WebhookError(str(err)) from None


def ensure_secret(session: Session, settings: Settings, tenant: str) -> str | None:
    """Create the tenant's signing secret if it has none; returns it then (else None). One
    INSERT that a concurrent one cannot fail: two first endpoints at once were a 500."""
    if session.get(WebhookSecret, tenant) is not None:
        return None
    secret = new_secret()
    insert = dialect_insert(session, WebhookSecret).values(
        tenant=tenant, secret=crypto.encrypt(settings, secret)
    )
    insert = insert.on_conflict_do_nothing(index_elements=["tenant"])
    created = session.scalar(insert.returning(WebhookSecret.tenant))
    return secret if created is not None else None


def add_endpoint(
    session: Session, settings: Settings, tenant: str, url: str, events: list[str] | None = None
) -> Added:
    check_tenant(tenant)
    check_url(settings, url)
    column = events_column(events)
    secret = ensure_secret(session, settings, tenant)
    row = WebhookEndpoint(
        id="we_" + _random.token_hex(12), tenant=tenant, url=url, events=column, enabled=True
    )
    session.add(row)
    session.flush()
    return Added(endpoint=EndpointView.from_row(row), secret=secret)


def list_endpoints(session: Session, tenant: str | None) -> list[EndpointView]:
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.tenant, WebhookEndpoint.created_at)
    if tenant is not None:
        query = query.where(WebhookEndpoint.tenant == tenant)
    return [EndpointView.from_row(r) for r in session.scalars(query)]


ENDPOINT_ID = re.compile(r"we_[0-9a-f]{24}")
WEBHOOK_ID = re.compile(r"msg_[0-9a-f]{32}")  # webhooks/signing.py new_webhook_id


def _endpoint(session: Session, tenant: str | None, endpoint_id: str) -> WebhookEndpoint:
    # An id no endpoint can have (a NUL, which PostgreSQL refuses) is not looked up.
    row = session.get(WebhookEndpoint, endpoint_id) if ENDPOINT_ID.fullmatch(endpoint_id) else None
    if row is None or (tenant is not None and row.tenant != tenant):
        raise WebhookError(f"no webhook endpoint {endpoint_id!r}")
    return row


def remove_endpoint(session: Session, tenant: str | None, endpoint_id: str) -> None:
    """Delete the endpoint and its deliveries (pending ones are not sent)."""
    row = _endpoint(session, tenant, endpoint_id)
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id))
    session.delete(row)


def rotate_secret(session: Session, settings: Settings, tenant: str) -> str:
    """A new signing secret for the tenant (returned once); the previous one keeps signing,
    beside it, for webhook_rotation_grace_s."""
    created = ensure_secret(session, settings, tenant)
    if created is not None:
        return created
    secret = new_secret()
    now = utcnow()
    # One UPDATE (`previous` takes the row's `secret` as it is when the UPDATE runs): a read
    # then a write let concurrent rotations each hand out a secret, most of which never signed,
    # and lose the true previous one.
    session.execute(
        update(WebhookSecret)
        .where(WebhookSecret.tenant == tenant)
        .values(
            previous=WebhookSecret.secret,
            secret=crypto.encrypt(settings, secret),
            previous_until=now + timedelta(seconds=settings.webhook_rotation_grace_s),
            rotated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return secret


def failed_deliveries(session: Session, tenant: str | None, limit: int = 100) -> list[DeliveryView]:
    """Dead deliveries, newest first."""
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.status == "dead")
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    )
    if tenant is not None:
        query = query.where(WebhookDelivery.tenant == tenant)
    return [DeliveryView.from_row(r) for r in session.scalars(query)]


def get_delivery(session: Session, tenant: str | None, ref: str) -> WebhookDelivery:
    """A delivery by its number or its webhook-id (`msg_...`)."""
    d = WebhookDelivery
    if ref.startswith("msg_"):
        # An id no delivery can have (a NUL, which PostgreSQL refuses) is not looked up.
        query = select(d).where(d.webhook_id == ref) if WEBHOOK_ID.fullmatch(ref) else None
    else:
        query = select(d).where(d.id == _int(ref))
    row = session.scalar(query) if query is not None else None
    if row is None or (tenant is not None and row.tenant != tenant):
        raise WebhookError(f"no webhook delivery {ref!r}")
    return row


def _int(ref: str) -> int:
    # ASCII digits an Integer id can be (a larger one PostgreSQL refuses).
    if ref.isascii() and ref.isdigit() and len(ref) <= 10 and int(ref) <= INTEGER_MAX:
        return int(ref)
    raise WebhookError(f"no webhook delivery {ref!r} (give its number or msg_ id)")


def redeliver(session: Session, settings: Settings, tenant: str | None, ref: str) -> DeliveryView:
    """Send a delivery again (same webhook-id), now, with a fresh retry window. An endpoint
    disabled by a 410 is enabled again (the operator says it is back)."""
    row = get_delivery(session, tenant, ref)
    now = utcnow()
    if row.endpoint_id is not None:
        session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == row.endpoint_id)
            .values(enabled=True, disabled_reason=None)
        )
    row.status = "pending"
    row.next_attempt_at = now
    row.expires_at = now + timedelta(seconds=settings.webhook_max_age_s)
    row.leased_until = None
    session.flush()
    return DeliveryView.from_row(row)


def require_signing_secrets(settings: Settings, items: Sequence[IntakeItem]) -> None:
    """The edge of a submit: a request naming its own webhook_url needs its tenant to have a
    signing secret (an unsigned webhook is never sent); refuse it with one line otherwise."""
    tenants = {
        (item.request.get("metadata") or {}).get("tenant", "default")
        for item in items
        if item.request.get("webhook_url")
    }
    if not tenants:
        return
    from core.db import session_scope

    with session_scope(settings.database_url) as session:
        have = set(
            session.scalars(select(WebhookSecret.tenant).where(WebhookSecret.tenant.in_(tenants)))
        )
    missing = sorted(tenants - have)
    if missing:
        raise InvalidRequest(
            f"invalid request: webhook_url: tenant {missing[0]!r} has no webhook signing secret"
            f" (create one: sheepdog webhooks rotate-secret --tenant {missing[0]})"
        )
