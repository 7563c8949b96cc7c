"""Webhook tables: each tenant's signing secret, its endpoints, and the outbox of deliveries.

Rows of the outbox are written in the transaction that ends their request or batch job
(webhooks/outbox.py), so an event is never lost between "ended" and "delivered"."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from models.tables import Base, utcnow

PENDING = text("status = 'pending'")


class WebhookSecret(Base):
    """A tenant's signing secret (`whsec_...`), Fernet-encrypted with the deployment's key, and
    the previous one, still used to sign (beside the new one) until `previous_until`."""

    __tablename__ = "webhook_secrets"

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    secret: Mapped[str] = mapped_column(Text)
    previous: Mapped[str | None] = mapped_column(Text)
    previous_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rotated_at: Mapped[datetime | None]


class WebhookEndpoint(Base):
    """A URL a tenant registered for its events. `events` is `*` or `,a,b,` (portable LIKE)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[str] = mapped_column(String(500), default="*")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookDelivery(Base):
    """One event for one target (an endpoint, or the request's own `webhook_url`).

    `webhook_id` is the Standard Webhooks message id: the same on every attempt. `target` is the
    endpoint id or `request` (the request's own URL, in `url`); (subject, event, target) is
    unique, so writing the same end twice adds nothing. A request event's `payload` is null
    until its first attempt renders the (final, unchanging) request row; see outbox.py."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("uq_webhook_deliveries_event", "subject_id", "event_type", "target", unique=True),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=PENDING,
            sqlite_where=PENDING,
        ),
        Index("ix_webhook_deliveries_tenant_status", "tenant", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant: Mapped[str] = mapped_column(String(100))
    target: Mapped[str] = mapped_column(String(40))
    endpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    url: Mapped[str | None] = mapped_column(String(2000))
    event_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(12), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]  # retried until then (webhook_max_age_s), then dead
    leased_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
