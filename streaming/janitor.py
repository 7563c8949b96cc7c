"""The janitor: finds streams whose worker died and gives them to another, or fails them.

A streaming row whose heartbeat is older than heartbeat_timeout_s lost its worker (crash, kill,
lost host): it goes back to `queued` with attempts+1 (the fencing token the old worker's writes
are checked against), subscribers get `reset`, and `sheepdog.stream` is sent again with the id
only. Past stream_max_attempts it fails. Stream-route rows still `queued` long after their last
change lost their message (e.g. a Redis restart) and are sent again, once per timeout.

Safe to run twice and under two beats: a Redis lock serialises runs, and every move is the
lifecycle's conditional UPDATE, so a row can only be taken back once.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select

from core import keys
from core.celery_app import celery_for
from core.db import session_scope
from core.redis_conn import get_redis
from core.settings import Settings, get_settings
from costs import ledger
from lifecycle.dispatch import send_stream
from lifecycle.moves import move
from models.status import Status
from models.tables import Request, utcnow
from rules.tokens import count_message_tokens
from streaming.billing import Billed
from streaming.end import End
from streaming.lanes import TIER_ASKED
from streaming.lookups import log_seen
from streaming.out_of_band import publish_error

log = logging.getLogger("sheepdog.janitor")

SWEEP_LIMIT = 1000
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


@dataclass
class SweepReport:
    requeued: int = 0
    failed: int = 0
    resent: int = 0
    skipped: bool = False


def sweep(settings: Settings | None = None, app: Any = None) -> SweepReport:
    """One janitor pass (returns what it did; skipped when another pass holds the lock)."""
    settings = settings or get_settings()
    redis = get_redis(settings.redis_url)
    token = secrets.token_hex(8)
    ttl_ms = int(max(settings.janitor_interval_s * 4, 30) * 1000)
    lock = keys.of(settings).janitor_lock
    if not redis.set(lock, token, nx=True, px=ttl_ms):
        return SweepReport(skipped=True)
    try:
        return _sweep(settings, app)
    finally:
        redis.eval(_RELEASE, 1, lock, token)


def _fail_lost(settings: Settings, rid: str, attempts: int, lane: str | None, reason: str) -> bool:
    """Fail a stream its workers kept losing, charged what they sent (its replay log's text:
    the provider billed it) in the move's transaction, so its hold settles to the charge."""
    seen = log_seen(get_redis(settings.redis_url), keys.of(settings), rid)
    with session_scope(settings.database_url) as session:
        row = session.get(Request, rid)
        if row is None:
            return False
        usage: dict[str, Any] = {}
        if seen is not None:
            prompt = count_message_tokens((row.body or {}).get("messages") or [])
            usage = Billed(seen.runs, seen.tokens).cut(prompt, 0, "")
        end = End(Status.FAILED, "", error=reason, service_tier=TIER_ASKED.get(lane or ""), **usage)
        cost = end.cost(row.model)
        if cost is not None:
            ledger.record(session, [end.usage(rid, row.tenant, row.model)])
        values = {k: v for k, v in end.row_values(cost).items() if k != "text"}
        moved = move(
            session, rid, Status.FAILED, from_=[Status.STREAMING], attempts=attempts + 1, **values
        )
        if not moved:
            session.rollback()  # its ledger entry too: another pass or a late end moved it
        return moved


def _send(settings: Settings, app: Any, request_id: str, lane: str | None, why: str) -> None:
    send_stream(app or celery_for(settings), request_id, why=why, lane=lane, resent=True)


def _sweep(settings: Settings, app: Any) -> SweepReport:
    report = SweepReport()
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.heartbeat_timeout_s)
    with session_scope(settings.database_url) as session:
        stale = session.execute(
            select(Request.id, Request.attempts, Request.lane)
            .where(
                Request.status == Status.STREAMING.value,
                Request.route == "stream",
                or_(Request.heartbeat_at < stale_before, Request.heartbeat_at.is_(None)),
            )
            .limit(SWEEP_LIMIT)
        ).all()
    for rid, attempts, lane in stale:
        if attempts + 1 >= settings.stream_max_attempts:
            silence = f"{settings.heartbeat_timeout_s:g}s"
            reason = f"worker lost {attempts + 1} times (no heartbeat for {silence})"
            if _fail_lost(settings, rid, attempts, lane, reason):
                publish_error(settings, rid, reason, attempts=attempts + 1)
                report.failed += 1
            continue
        with session_scope(settings.database_url) as session:
            moved = move(
                session,
                rid,
                Status.QUEUED,
                from_=[Status.STREAMING],
                attempts=Request.attempts + 1,
                heartbeat_at=None,
                updated_at=now,
            )
        if moved:
            # Fences the lost attempt off: from here Redis refuses its messages, as the row
            # refuses its writes.
            publish_error(settings, rid, "", type_="reset", attempts=attempts + 1)
            _send(settings, app, rid, lane, "re-sent: its worker died")
            report.requeued += 1
            log.warning(
                "%s: no heartbeat since before %s; requeued (attempt %d)",
                rid,
                stale_before,
                attempts + 2,
            )
    report.resent = _resend_lost(settings, app, now)
    return report


def _resend_lost(settings: Settings, app: Any, now: Any) -> int:
    """Send `sheepdog.stream` again for stream rows queued too long (their message was lost)."""
    before = now - timedelta(seconds=settings.stream_queued_timeout_s)
    with session_scope(settings.database_url) as session:
        lost = session.execute(
            select(Request.id, Request.lane)
            .where(
                Request.status == Status.QUEUED.value,
                Request.route == "stream",
                Request.updated_at < before,
            )
            .limit(SWEEP_LIMIT)
        ).all()
    if not lost:
        return 0
    redis = get_redis(settings.redis_url)
    resent = 0
    for rid, lane in lost:
        # Once per timeout: a long backlog must not turn into a storm of duplicates.
        if redis.set(
            keys.of(settings).janitor_resent(rid),
            b"1",
            nx=True,
            ex=int(settings.stream_queued_timeout_s),
        ):
            _send(settings, app, rid, lane, "re-sent: its message was lost")
            resent += 1
    if resent:
        log.warning(
            "resent %d stream request(s) queued for over %gs",
            resent,
            settings.stream_queued_timeout_s,
        )
    return resent
