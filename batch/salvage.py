"""Salvage: a request a batch gave back unfinished (expired, cancelled, lost) whose deadline
cannot wait for another batch window goes to the stream path's cheapest lane that still meets
it (flex at the batch rate when its provider sells flex, else the standard stream), instead of
the next batch it would miss. Its stream task is sent once the move has committed."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from core.celery_app import celery_for
from core.db import among
from core.providers import tiers_for
from core.settings import Settings
from costs.lane_change import refit
from lifecycle.dispatch import send_stream
from lifecycle.moves import move_each
from models.status import Status
from models.tables import Request, max_chars
from rules.prices import PriceTable, billed_lane, load_price_table
from rules.routing import batch_horizon, cheapest_lane

log = logging.getLogger("sheepdog.batch.salvage")

Row = tuple[str, int, str]  # (id, attempts, why it came back)
PENDING = "sheepdog.salvaged"  # session.info key: ids whose stream task waits for the commit


def salvage(session: Session, settings: Settings, rows: Sequence[Row]) -> tuple[list[Row], int]:
    """Move the rows whose deadline falls before another batch window could end to a stream
    lane; returns (the other rows, for the next batch as before; how many were salvaged)."""
    if not rows:
        return [], 0
    now = datetime.now(UTC)
    found = session.execute(
        select(Request.id, Request.model, Request.deadline).where(
            among(session, Request.id, [r[0] for r in rows]),
            Request.deadline.is_not(None),
            Request.deadline < batch_horizon(settings, now),
        )
    )
    due = {rid: (model, deadline) for rid, model, deadline in found if deadline is not None}
    if not due:
        return list(rows), 0
    # Flex or stream only (a batch cannot meet these deadlines): rates no provider's batch
    # discount changes, so the settings' table, with no Redis read under the write lock.
    prices = load_price_table(settings.price_table_file)
    fit = refit(session, list(due), billed_lane("flex"), prices)  # cap and hold there
    for rid in fit.kept:
        log.warning(
            "request %s stays for the next batch: the stream lane's rate would take it"
            " past its cost cap or budget hold",
            rid,
        )
        del due[rid]
    if not due:
        return list(rows), 0
    fit.write(session, Request.status == Status.BATCHED.value)
    moves = [
        _lane_move(settings, prices, rid, *due[rid], why, now) for rid, _, why in rows if rid in due
    ]
    moved = 0
    for lane in ("flex", "stream"):
        group = [m for m in moves if m["lane"] == lane]
        if group:
            moved += move_each(session, group, Status.QUEUED, from_=[Status.BATCHED])
    _send_after_commit(session, settings, [(m["id"], m["lane"]) for m in moves])
    return [r for r in rows if r[0] not in due], moved


def _lane_move(
    settings: Settings,
    prices: PriceTable,
    rid: str,
    model: str,
    deadline: datetime,
    why: str,
    now: datetime,
) -> dict[str, Any]:
    price = prices.get(model) if model in prices else None
    choice = cheapest_lane(deadline, settings, tiers_for(model, settings), price, now)
    reason = f"salvaged ({_short(why)}): {choice.reason.removeprefix('low: ')}"
    return {
        "id": rid,
        "route": "stream",
        "lane": choice.lane,
        "lane_reason": reason[: max_chars("lane_reason")],
        "escalated": True,
        "batch_job_id": None,
        "error": None,
    }


SHORT = {"batch_expired": "the batch expired", "batch_cancelled": "the batch was cancelled"}


def _short(why: str) -> str:
    """A result line's error code in words (the rest of the line is the provider's text)."""
    code = why.split(":", 1)[0].strip()
    return SHORT.get(code, why[:80])


def _send_after_commit(session: Session, settings: Settings, ids: list[tuple[str, str]]) -> None:
    """Queue `ids`' stream tasks for when the session commits: a task that ran before would
    find its row still batched. A send that fails is left to the janitor, which re-sends
    stream rows left queued."""
    pending: list[tuple[str, str]] | None = session.info.get(PENDING)
    if pending is not None:
        pending.extend(ids)
        return
    session.info[PENDING] = list(ids)

    def send(done: Session) -> None:
        names = done.info.pop(PENDING, [])
        with contextlib.suppress(Exception):
            app = celery_for(settings)
            with app.producer_or_acquire() as producer:
                for rid, lane in names:
                    send_stream(app, rid, why="salvaged", producer=producer, lane=lane)
        log.info("salvaged %d request(s) from a batch to the stream path", len(names))

    def forget(done: Session) -> None:
        done.info.pop(PENDING, None)

    event.listen(session, "after_commit", send, once=True)
    event.listen(session, "after_rollback", forget, once=True)
