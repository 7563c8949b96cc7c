"""Webhook metrics from the outbox (workers/metrics.py's database collector adds them)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, type_coerce
from sqlalchemy.orm import Session

from models.tables import UTCDateTime, utcnow
from models.webhook_tables import WebhookDelivery, WebhookEndpoint


def webhook_families(session: Session) -> list[Any]:
    """Deliveries by outcome (pending, delivered, dead), the age of the oldest pending one,
    and endpoints enabled or disabled (a 410 disables one)."""
    from prometheus_client.core import GaugeMetricFamily

    deliveries = GaugeMetricFamily(
        "sheepdog_webhook_deliveries", "Webhook deliveries by outcome", labels=["status"]
    )
    oldest = GaugeMetricFamily(
        "sheepdog_webhook_oldest_pending_seconds",
        "Age of the oldest webhook delivery not yet delivered (0: none pending)",
    )
    endpoints = GaugeMetricFamily(
        "sheepdog_webhook_endpoints", "Webhook endpoints", labels=["state"]
    )
    counts = dict.fromkeys(("pending", "delivered", "dead"), 0)
    for status, n in session.execute(
        select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
    ):
        counts[status] = n
    for status, n in counts.items():
        deliveries.add_metric([status], n)
    # type_coerce: the aggregate read back as a UTC datetime on SQLite too (stored as text)
    first = session.scalar(
        select(type_coerce(func.min(WebhookDelivery.created_at), UTCDateTime())).where(
            WebhookDelivery.status == "pending"
        )
    )
    oldest.add_metric([], max(0.0, (utcnow() - first).total_seconds()) if first else 0.0)
    states = {True: 0, False: 0}
    for enabled, n in session.execute(
        select(WebhookEndpoint.enabled, func.count()).group_by(WebhookEndpoint.enabled)
    ):
        states[bool(enabled)] = n
    endpoints.add_metric(["enabled"], states[True])
    endpoints.add_metric(["disabled"], states[False])
    return [deliveries, oldest, endpoints]
