"""Batch rows whose deadline a batch would miss take flex, at the flush, when it is sold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from batch.flush import flush
from core.db import session_scope
from models.tables import Request
from tests.fixtures.batch import add_requests, make_settings

MINI = "sheepdog-mini"


def lanes_of(url: str, ids: list[str]) -> dict[str, tuple[str, str | None, str | None, str]]:
    with session_scope(url) as session:
        found = session.execute(
            select(
                Request.id, Request.route, Request.lane, Request.lane_reason, Request.status
            ).where(Request.id.in_(ids))
        ).all()
    return {rid: (route, lane, reason, status) for rid, route, lane, reason, status in found}


def test_flush_escalates_to_flex_when_the_provider_sells_it(
    batch_db: str, redis_url: str, simulator: Any, tmp_path: Path
) -> None:
    settings = make_settings(batch_db, redis_url, simulator, tmp_path)
    sold = settings.model_copy(update={"openai_service_tiers": "flex,priority"})
    due = (datetime.now(UTC) + timedelta(hours=30)).isoformat()
    flex = add_requests(sold, [(MINI, "flex, deadline soon")], deadline=due)
    assert lanes_of(batch_db, flex)[flex[0]][:2] == ("batch", "batch")
    # The window grows past the deadline: a batch submitted now would miss it.
    report = flush(sold.model_copy(update={"batch_window_s": 40 * 3600}))
    assert report.escalated == 1
    got = lanes_of(batch_db, flex)
    assert got[flex[0]][:2] == ("stream", "flex")
    assert got[flex[0]][2] is not None and "flex at the batch rate" in got[flex[0]][2]
    assert got[flex[0]][3] == "queued"
