"""The database figures the alerting rules watch (deploy/prometheus/alerts.yml): the oldest
open batch job's age and each budget's use, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import update

from core.db import session_scope
from core.settings import Settings
from costs.budget_limits import set_budget
from models.tables import BatchJob, CostEntry, utcnow
from workers.metrics import database_families


def samples(settings: Settings, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    family: Any
    for family in database_families(settings):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_oldest_open_batch_job_counts_from_submission(db_url: str) -> None:
    settings = Settings(database_url=db_url)
    job_id = f"bj_{uuid.uuid4().hex[:24]}"
    now = utcnow()
    with session_scope(db_url) as session:
        session.add(
            BatchJob(
                id=job_id,
                model="sheepdog-mini",
                status="in_progress",
                created_at=now - timedelta(hours=31),
                submitted_at=now - timedelta(hours=30),
            )
        )
    age = samples(settings, "sheepdog_batch_job_oldest_open_seconds")[()]
    assert 30 * 3600 - 60 <= age <= 30 * 3600 + 600, age
    with session_scope(db_url) as session:
        session.execute(update(BatchJob).where(BatchJob.id == job_id).values(status="completed"))
    assert samples(settings, "sheepdog_batch_job_oldest_open_seconds")[()] < 29 * 3600


def test_budget_used_ratio_counts_spend_and_held(db_url: str) -> None:
    settings = Settings(database_url=db_url)
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    with session_scope(db_url) as session:
        set_budget(session, tenant, daily_usd=Decimal("1.00"), monthly_usd=Decimal("10.00"))
        session.add(
            CostEntry(
                request_id=f"req_{uuid.uuid4().hex}",
                tenant=tenant,
                model="sheepdog-mini",
                route="stream",
                cost_usd=Decimal("0.92"),
                standard_cost_usd=Decimal("0.92"),
            )
        )
    ratios = samples(settings, "sheepdog_budget_used_ratio")
    assert abs(ratios[(("period", "day"), ("tenant", tenant))] - 0.92) < 1e-9, ratios
    assert abs(ratios[(("period", "month"), ("tenant", tenant))] - 0.092) < 1e-9, ratios
