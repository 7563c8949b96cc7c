"""Batch rows whose deadline a batch would miss take flex, at the flush, when it is sold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
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
    assert got[flex[0]][2] is not None and "escalated at the flush: flex," in got[flex[0]][2]
    assert got[flex[0]][3] == "queued"


def test_an_escalated_row_is_capped_again_or_stays_when_its_cap_cannot_pay(
    batch_db: str, redis_url: str, simulator: Any, tmp_path: Path
) -> None:
    """Capped at the batch rate, escalated at the flush to a lane that may bill the standard
    rate: its max_tokens is cut to what the cap buys there; one whose cap does not even cover
    its prompt there stays on the batch lane (the cap is a limit, the deadline a wish)."""
    from rules.caps import max_tokens_for_cap
    from rules.prices import price_table
    from rules.tokens import count_message_tokens

    settings = make_settings(batch_db, redis_url, simulator, tmp_path)
    due = (datetime.now(UTC) + timedelta(hours=30)).isoformat()
    price = price_table().get(MINI)
    texts = ["capped, deadline soon", "too poor for the stream lane"]
    prompts = [count_message_tokens([{"role": "user", "content": t}]) for t in texts]
    roomy = price.cost(prompts[0], 40, "batch")
    poor = price.cost(prompts[1], 1, "batch") + Decimal("0.0000000001")
    assert poor < price.cost(prompts[1], 1, "stream")
    ids = [
        add_requests(settings, [(MINI, text)], deadline=due, max_cost_usd=str(cap))[0]
        for text, cap in zip(texts, (roomy, poor), strict=True)
    ]
    report = flush(settings.model_copy(update={"batch_window_s": 40 * 3600}))
    assert report.escalated == 1
    got = lanes_of(batch_db, ids)
    assert got[ids[0]][:2] == ("stream", "stream") and got[ids[0]][3] == "queued"
    assert got[ids[1]][:2] == ("batch", "batch") and got[ids[1]][3] == "batched"
    with session_scope(batch_db) as session:
        found = session.execute(select(Request.id, Request.body).where(Request.id.in_(ids)))
        bodies = {rid: body for rid, body in found}
    expected = max_tokens_for_cap(price, MINI, prompts[0], roomy, "stream")
    assert bodies[ids[0]]["max_tokens"] == expected < 40
