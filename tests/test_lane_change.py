"""costs.lane_change.refit on real rows (SQLite and PostgreSQL): a batch row moved to a dearer
lane keeps to the smaller of its cap and its hold, a second refit changes nothing, a row the
limits cannot pay for is kept, and a row that moved on meanwhile keeps its body."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from core.db import session_scope
from core.settings import Settings
from costs.lane_change import refit
from costs.reservations import HELD
from models.status import Status
from models.tables import Request, Reservation
from rules.caps import max_tokens_for_cap
from rules.prices import billed_lane, price_table
from rules.tokens import count_message_tokens
from tests.fixtures.batch import add_requests, make_settings

MINI = "sheepdog-mini"
TEXT = "a batch line moved to the stream lane"


def _hold(url: str, rid: str, amount: Decimal) -> None:
    with session_scope(url) as session:
        session.execute(
            insert(Reservation).values(
                request_id=rid, tenant="default", amount_usd=amount, state=HELD
            )
        )


def _bodies(url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    with session_scope(url) as session:
        found = session.execute(select(Request.id, Request.body).where(Request.id.in_(ids)))
        return {rid: body for rid, body in found}


PRICE = price_table().get(MINI)
PROMPT = count_message_tokens([{"role": "user", "content": TEXT}])


@pytest.fixture
def settings(batch_db: str, redis_url: str, simulator: Any, tmp_path: Path) -> Settings:
    return make_settings(batch_db, redis_url, simulator, tmp_path)


def test_a_refit_keeps_to_the_smaller_limit_and_a_second_one_changes_nothing(
    batch_db: str, settings: Settings
) -> None:
    cap = PRICE.cost(PROMPT, 30, "batch")  # ~15 output tokens at the standard rate
    hold = PRICE.cost(PROMPT, 20, "batch")  # fewer: where it is held, the hold binds
    poor = PRICE.cost(PROMPT, 1, "batch")  # not even the prompt at the standard rate
    capped, held, kept = (
        add_requests(settings, [(MINI, TEXT)], max_cost_usd=str(cap))[0],
        add_requests(settings, [(MINI, TEXT)])[0],
        add_requests(settings, [(MINI, TEXT)])[0],
    )
    _hold(batch_db, held, hold)
    _hold(batch_db, capped, cap * 2)  # the cap binds here
    _hold(batch_db, kept, poor)
    ids = [capped, held, kept]
    with session_scope(batch_db) as session:
        fit = refit(session, ids, billed_lane("flex"))
        fit.write(session, Request.status == Status.QUEUED.value)
    assert fit.kept == {kept}
    want = max_tokens_for_cap(PRICE, MINI, PROMPT, hold, "stream")
    by_cap = max_tokens_for_cap(PRICE, MINI, PROMPT, cap, "stream")
    assert want < by_cap < 30
    bodies = _bodies(batch_db, ids)
    assert bodies[capped]["max_tokens"] == by_cap and bodies[held]["max_tokens"] == want
    assert bodies[kept]["max_tokens"] == 40
    with session_scope(batch_db) as session:  # a redelivered flush or salvage: the same rows
        again = refit(session, ids, "stream")
    assert again.bodies == {} and again.kept == {kept}


def test_a_refit_does_not_write_over_a_row_that_moved_on(batch_db: str, settings: Settings) -> None:
    rid = add_requests(settings, [(MINI, TEXT)], max_cost_usd=str(PRICE.cost(PROMPT, 30, "batch")))
    given = _bodies(batch_db, rid)[rid[0]]["max_tokens"]  # 30: what the cap buys on batch
    with session_scope(batch_db) as session:
        fit = refit(session, rid, "stream")
        assert fit.bodies  # it would be cut ...
        session.execute(  # ... but a cancel ended it meanwhile
            update(Request).where(Request.id == rid[0]).values(status=Status.CANCELLED.value)
        )
        fit.write(session, Request.status == Status.QUEUED.value)
    assert _bodies(batch_db, rid)[rid[0]]["max_tokens"] == given


def test_a_flex_request_is_priced_at_the_standard_rate_everywhere() -> None:
    """One home for the rule: the cap at submit, the hold and a refit all ask billed_lane."""
    assert billed_lane("flex") == "stream"
    assert [billed_lane(x) for x in ("batch", "stream", "priority")] == [
        "batch",
        "stream",
        "priority",
    ]
