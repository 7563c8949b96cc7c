"""Claiming queued batch-route requests into batch jobs, atomically.

One transaction selects the queued rows (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so two flushes
take disjoint rows; SQLite: `BEGIN IMMEDIATE`, its single writer), groups them by model, splits
the groups at the line and byte limits, inserts one `preparing` batch job per group and moves
the rows to `batched` with that job's id. Either all of it commits or none of it does.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import LargeBinary, Text, cast, func, insert, select, update
from sqlalchemy.orm import Session

from core.db import begin_write
from core.providers import tiers_for
from core.settings import Settings
from costs.lane_change import refit
from lifecycle.moves import move_many
from models.batch_lines import CHAT_URL
from models.status import BatchStatus, Status
from models.tables import BatchJob, Request, utcnow
from rules.prices import billed_lane, load_price_table
from rules.routing import batch_horizon, cheapest_lane

log = logging.getLogger("sheepdog.batch.claim")

# Bytes a line adds around its body: {"custom_id":"…","method":"POST","url":"…","body":…}\n
LINE_OVERHEAD = len('{"custom_id":"","method":"POST","url":"","body":}\n') + len(CHAT_URL)


def new_job_id() -> str:
    return "bj_" + secrets.token_hex(12)


def lock_rows(stmt: Any, session: Session) -> Any:
    """`stmt` with FOR UPDATE SKIP LOCKED on PostgreSQL (SQLite has no row locks)."""
    if session.get_bind().dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=True)
    return stmt


def _body_bytes(session: Session) -> Any:
    # The stored JSON text is json.dumps with spaces and ASCII escapes, never shorter than the
    # compact UTF-8 line we write: an upper bound, so a file split on it never exceeds the limit.
    if session.get_bind().dialect.name == "postgresql":
        return func.octet_length(cast(Request.body, Text))
    return func.length(cast(Request.body, LargeBinary))


@dataclass
class Group:
    """One future batch job: a model and the requests that go in its file."""

    job_id: str
    model: str
    ids: list[str] = field(default_factory=list)
    bytes: int = 0


@dataclass
class ClaimedRows:
    """What one claim did: the rows it grouped into jobs, failed as too large, or escalated."""

    groups: list[Group] = field(default_factory=list)
    too_large: list[str] = field(default_factory=list)
    escalated: list[str] = field(default_factory=list)
    flex: set[str] = field(default_factory=set)  # the escalated ones that took the flex lane

    @property
    def claimed(self) -> int:
        return sum(len(g.ids) for g in self.groups)


# One reason a lane (one UPDATE a lane, however many rows): a deadline a batch would miss.
ESCALATED = {
    "flex": "escalated at the flush: flex, the deadline cannot wait a batch",
    "stream": "escalated at the flush: stream, the deadline is too close for batch or flex",
}


def _escalate_rows(
    session: Session, settings: Settings, due: Any, base: Any
) -> tuple[list[str], set[str]]:
    """Move rows whose deadline a batch submitted now would miss to the stream path, on the
    cheapest lane that still meets it (flex when their provider sells it), their max_tokens
    within their cap and hold there (costs/lane_change.py); (the moved, the flex ones). A row
    whose prompt alone its cap or hold cannot pay for there stays for this flush's batch."""
    # Flex or stream only (a batch cannot meet these deadlines): rates no provider's batch
    # discount changes, so the settings' table, with no Redis read under the write lock.
    prices = load_price_table(settings.price_table_file)
    fit = refit(session, [rid for rid, _, _ in due], billed_lane("flex"), prices)
    by_lane: dict[str, list[str]] = {}
    for rid, model, deadline in due:
        if rid in fit.kept:
            continue
        price = prices.get(model) if model in prices else None
        tiers = tiers_for(model, settings)
        choice = cheapest_lane(deadline, settings, tiers, price, flushing=True)
        by_lane.setdefault(choice.lane, []).append(rid)
    if fit.kept:
        log.warning(
            "flush: %d request(s) stay on the batch lane past their deadline: the stream lane's"
            " rate would take them past their cost cap or budget hold",
            len(fit.kept),
        )
    fit.write(session, base)
    for lane, ids in by_lane.items():
        reason = ESCALATED.get(lane, ESCALATED["stream"])
        session.execute(
            update(Request)
            .where(Request.id.in_(ids), base)
            .values(
                route="stream", lane=lane, lane_reason=reason, escalated=True, updated_at=utcnow()
            )
            .execution_options(synchronize_session=False)
        )
    return [rid for ids in by_lane.values() for rid in ids], set(by_lane.get("flex", ()))


def split(
    rows: Iterable[tuple[str, str, int]], max_lines: int, max_bytes: int
) -> tuple[list[Group], list[str]]:
    """Group (id, model, body bytes) rows by model, in order, and cut each group at `max_lines`
    lines and `max_bytes` bytes. Returns the groups and the ids too large for any file."""
    open_groups: dict[str, Group] = {}
    groups: list[Group] = []
    too_large: list[str] = []
    for request_id, model, body_bytes in rows:
        size = int(body_bytes or 0) + len(request_id) + LINE_OVERHEAD
        if size > max_bytes:
            too_large.append(request_id)
            continue
        group = open_groups.get(model)
        if group is None or len(group.ids) >= max_lines or group.bytes + size > max_bytes:
            group = Group(new_job_id(), model)
            open_groups[model] = group
            groups.append(group)
        group.ids.append(request_id)
        group.bytes += size
    return groups, too_large


def claim(
    session: Session,
    settings: Settings,
    *,
    on_groups: Callable[[list[Group]], None] | None = None,
) -> ClaimedRows:
    """Claim queued batch rows into new `preparing` jobs (the caller commits).

    Rows whose deadline falls before a batch submitted now could end are not claimed but moved
    to the stream route (escalated); the caller sends their stream tasks after commit.
    `on_groups` runs before the rows move (e.g. to take each job's lock before anyone can see
    the job)."""
    begin_write(session)
    result = ClaimedRows()
    base = (Request.status == Status.QUEUED.value) & (Request.route == "batch")
    due = session.execute(
        lock_rows(
            select(Request.id, Request.model, Request.deadline).where(
                base,
                Request.deadline.is_not(None),
                Request.deadline < batch_horizon(settings, flushing=True),
            ),
            session,
        )
    ).all()
    if due:
        result.escalated, result.flex = _escalate_rows(session, settings, due, base)
    rows = session.execute(
        lock_rows(
            select(Request.id, Request.model, _body_bytes(session))
            .where(base)
            .order_by(Request.created_at, Request.id)
            .limit(settings.batch_claim_limit),
            session,
        )
    ).all()
    groups, too_large = split(
        ((r[0], r[1], r[2]) for r in rows), settings.batch_max_lines, settings.batch_max_bytes
    )
    if too_large:
        move_many(
            session,
            too_large,
            Status.FAILED,
            from_=[Status.QUEUED],
            error=f"request too large for a batch file (limit {settings.batch_max_bytes} bytes)",
        )
        result.too_large = too_large
    if not groups:
        return result
    if on_groups is not None:
        on_groups(groups)
    now = utcnow()
    session.execute(
        insert(BatchJob),
        [
            {
                "id": g.job_id,
                "model": g.model,
                "status": BatchStatus.PREPARING.value,  # a new job: the machine's start
                "request_count": len(g.ids),
                "input_bytes": g.bytes,
                "created_at": now,
                "updated_at": now,
            }
            for g in groups
        ],
    )
    for g in groups:
        moved = move_many(
            session,
            g.ids,
            Status.BATCHED,
            from_=[Status.QUEUED],
            batch_job_id=g.job_id,
            attempts=Request.attempts + 1,
        )
        if moved != len(g.ids):  # cannot happen under the row locks; say so if it does
            log.warning("job %s: %d of %d rows moved", g.job_id, moved, len(g.ids))
    result.groups = groups
    return result
