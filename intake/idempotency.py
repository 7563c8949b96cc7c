"""Idempotency keys at submit: each keyed request claims its key in Redis before anything is
sent, and a resend of the same request gets the first submit's id.

A claim's value is `<id> <fingerprint of the request>`. A resend is answered with the first id
only once that submit's row exists (the producer writes it before its ids go back): a claim with
no row yet is a submit still under way, or one that failed and is about to let go of its key,
and the resend gets an in-progress conflict (409; the SDKs resend after a back-off) rather than
an id that may never exist. A claim older than STALE_CLAIM_S (by its TTL in Redis: one clock for
every producer) with no row is a submit that died between its claim and its row: the resend
takes the key over. A submit lets go only of the claims that are still its own.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import keys
from core.db import among, session_scope
from core.errors import (
    DATABASE_HINT,
    REDIS_HINT,
    IdempotencyConflict,
    ServiceUnavailable,
    redact_url,
)
from core.redis_conn import get_redis
from core.settings import Settings
from lifecycle.record import TRANSIENT
from models.intake_message import IntakeItem
from models.tables import Request

IDEMPOTENCY_TTL_S = 7 * 24 * 3600
# A claim this old with no row: its submit died before writing it (as release-stale's floor:
# no submit still under way is that slow).
STALE_CLAIM_S = 15 * 60
IN_CHUNK = 5000

# Replace a claim only if it is still the one read (another resend may have taken it over).
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""
# Delete each key only while it still names this submit's id (another may have taken it over).
_RELEASE = """
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value and string.sub(value, 1, string.len(ARGV[i])) == ARGV[i] then
    redis.call('DEL', key)
  end
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """A key's value as stored (one from before fingerprints is a bare id), and its age."""

    raw: bytes
    id: str
    fingerprint: str
    age_s: float

    @classmethod
    def parse(cls, raw: bytes, ttl_ms: int) -> Claim:
        first_id, _, fp = raw.decode(errors="replace").partition(" ")
        return cls(raw, first_id, fp, IDEMPOTENCY_TTL_S - max(ttl_ms, 0) / 1000)


def fingerprint(item: IntakeItem) -> str:
    """What makes two submits the same request: the validated request, keys sorted."""
    return hashlib.sha256(orjson.dumps(item.request, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def claim_keys(settings: Settings, items: list[IntakeItem], ids: list[str]) -> list[IntakeItem]:
    """Claim each keyed item's key; return the items to send. A key held for the same request
    by a submit whose row exists answers that id (in `ids`) and its item is not sent; one held
    for a different request, or by a submit still under way, is an IdempotencyConflict, and
    nothing of this call is kept."""
    keyed = [(i, item) for i, item in enumerate(items) if item.request.get("idempotency_key")]
    if not keyed:
        return items
    names = keys.of(settings)
    prints = [fingerprint(item) for _, item in keyed]
    claims = [f"{item.id} {fp}" for (_, item), fp in zip(keyed, prints, strict=True)]
    try:
        with get_redis(settings.redis_url).pipeline(transaction=False) as pipe:
            for (_, item), claim in zip(keyed, claims, strict=True):
                name = names.idempotency(item.request["idempotency_key"])
                pipe.set(name, claim, nx=True, ex=IDEMPOTENCY_TTL_S, get=True)
                pipe.pttl(name)
            replies = pipe.execute()
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise redis_down(settings) from err
    skip: set[int] = set()
    mine: dict[str, tuple[IntakeItem, str]] = {}  # the keys this call holds
    held: list[tuple[int, IntakeItem, str, Claim]] = []  # the same request's, by another call
    conflict: IdempotencyConflict | None = None
    ours = {item.id for _, item in keyed}
    for (index, item), fp, prior, ttl, claim in zip(
        keyed, prints, replies[::2], replies[1::2], claims, strict=True
    ):
        key = item.request["idempotency_key"]
        first_claim = Claim.parse(prior, ttl) if prior is not None else None
        if first_claim is None:
            mine[key] = (item, fp)
        elif first_claim.id in ours:  # the same key twice in one call
            if first_claim.fingerprint != fp:
                conflict = conflict or IdempotencyConflict(key, None)
            ids[index] = first_claim.id
            skip.add(index)
        elif first_claim.fingerprint and first_claim.fingerprint != fp:
            conflict = conflict or IdempotencyConflict(key, first_claim.id)
        else:
            held.append((index, item, claim, first_claim))
    try:
        if conflict is None and held:
            conflict = _answer_held(settings, held, ids, skip, mine)
        if conflict is not None:
            raise conflict
    except BaseException:  # nothing of this call is kept: the keys it holds go too
        release_claims([item for item, _ in mine.values()], settings)
        raise
    return [item for i, item in enumerate(items) if i not in skip]


def _answer_held(
    settings: Settings,
    held: list[tuple[int, IntakeItem, str, Claim]],
    ids: list[str],
    skip: set[int],
    mine: dict[str, tuple[IntakeItem, str]],
) -> IdempotencyConflict | None:
    """Keys held for the same request by other submits: their ids once their rows exist; a
    claim without a row is under way (the conflict returned), or taken over when stale."""
    # Without the producer's row (SHEEPDOG_PRODUCER_WRITES_ROWS=0) a worker writes it later:
    # the first id is answered at once, as it was.
    rows = settings.producer_writes_rows
    recorded = _recorded(settings, [c.id for _, _, _, c in held]) if rows else set()
    for index, item, claim, first in held:
        key = item.request["idempotency_key"]
        if not rows or first.id in recorded:
            ids[index] = first.id
        elif key in mine:  # the same key again in this call, taken over just now
            ids[index] = mine[key][0].id
        elif first.age_s >= STALE_CLAIM_S and _take_over(settings, key, first, claim):
            mine[key] = (item, first.fingerprint)
            continue  # sent by this call
        else:
            return IdempotencyConflict(key, first.id, in_progress=True)
        skip.add(index)
    return None


def _recorded(settings: Settings, request_ids: Sequence[str]) -> set[str]:
    """Which of `request_ids` have their rows."""
    try:
        with session_scope(settings.database_url) as session:
            return set(_rows_among(session, Request.id, request_ids))
    except TRANSIENT as err:
        raise ServiceUnavailable(
            "the database", redact_url(settings.database_url), DATABASE_HINT
        ) from err


def _rows_among(session: Session, column: Any, values: Sequence[str]) -> dict[str, str]:
    """`column` value -> the id of the row holding it, for those of `values` some row holds
    (in chunks: an IN list stays within the drivers' limits)."""
    found: dict[str, str] = {}
    for start in range(0, len(values), IN_CHUNK):
        chunk = values[start : start + IN_CHUNK]
        query = select(column, Request.id).where(among(session, column, chunk))
        found.update({value: rid for value, rid in session.execute(query)})
    return found


def _take_over(settings: Settings, key: str, first: Claim, claim: str) -> bool:
    client = get_redis(settings.redis_url)
    try:
        done = client.eval(
            _TAKE_OVER, 1, keys.of(settings).idempotency(key), first.raw, claim, IDEMPOTENCY_TTL_S
        )
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise redis_down(settings) from err
    return bool(done)


def release_claims(items: Sequence[IntakeItem], settings: Settings) -> None:
    """Let go of the keys these items claimed (their submit sent nothing), each only while it
    is still theirs."""
    keyed = [item for item in items if item.request.get("idempotency_key")]
    if not keyed:
        return
    names = [keys.of(settings).idempotency(item.request["idempotency_key"]) for item in keyed]
    with contextlib.suppress(redis.RedisError):
        client = get_redis(settings.redis_url)
        client.eval(_RELEASE, len(names), *names, *[f"{item.id} " for item in keyed])


def held_by_rows(session: Session, items: Sequence[IntakeItem]) -> dict[str, str]:
    """For keyed items whose own rows were not written because the table's unique key held
    theirs, the id of the row that holds it: an earlier submit of the same key whose claim
    Redis lost (restarted empty), or whose row committed unseen (its caller told the database
    was away, the claim let go). Answered with that id, a resend never gets one that does not
    exist."""
    keyed = {i.id: i.request["idempotency_key"] for i in items if i.request.get("idempotency_key")}
    if not keyed:
        return {}
    present = _rows_among(session, Request.id, list(keyed))
    missing = {rid: key for rid, key in keyed.items() if rid not in present}
    holders = _rows_among(session, Request.idempotency_key, sorted(set(missing.values())))
    return {rid: holders[key] for rid, key in missing.items() if key in holders}


def committed_unseen(db_url: str, items: Sequence[IntakeItem]) -> dict[str, str] | None:
    """After a write whose commit raised (the connection lost as the commit went out): the
    items answered by other rows (`held_by_rows`) when the transaction did commit, None when
    it did not or the database cannot tell yet. Committed: every item has its row or is held
    (some rows alone may be a stream worker's, which records the row it did not find)."""
    try:
        with session_scope(db_url) as session:
            present = _rows_among(session, Request.id, [item.id for item in items])
            held = held_by_rows(session, items)
    except Exception:
        return None
    return held if all(i.id in present or i.id in held for i in items) else None


def repoint_claims(settings: Settings, answered: Sequence[tuple[IntakeItem, str]]) -> None:
    """Claim each item's key for the row that holds it (`held_by_rows`), so later resends
    are answered from Redis again."""
    if not answered:
        return
    names = keys.of(settings)
    with (
        contextlib.suppress(redis.RedisError),
        get_redis(settings.redis_url).pipeline(transaction=False) as pipe,
    ):
        for item, holder in answered:
            claim = f"{holder} {fingerprint(item)}"
            pipe.set(
                names.idempotency(item.request["idempotency_key"]), claim, ex=IDEMPOTENCY_TTL_S
            )
        pipe.execute()


def redis_down(settings: Settings) -> ServiceUnavailable:
    return ServiceUnavailable("Redis", redact_url(settings.redis_url), REDIS_HINT)
