"""Idempotency keys at submit: each keyed request claims its key in Redis before anything is
sent, and a resend of the same request gets the first submit's id.

A claim's value is `<id> <fingerprint of the request> <claim time, ms>`. A resend is answered
with the first id only once that submit's row exists (the producer writes it before its ids go
back): a claim with no row yet is a submit still under way, or one that failed and is about to
let go of its key, and the resend gets an in-progress conflict (409; the SDKs resend after a
back-off) rather than an id that may never exist. A claim older than STALE_CLAIM_S with no row
is a submit that died between its claim and its row: the resend takes the key over.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import redis
from sqlalchemy import select

from core import keys
from core.db import session_scope
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
STALE_CLAIM_S = 60.0  # a claim this old with no row: its submit died before writing it

# Replace a claim only if it is still the one read (another resend may have taken it over).
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """A key's value as stored; a value from before fingerprints or times lacks them."""

    raw: bytes
    id: str
    fingerprint: str
    at_ms: int | None

    @classmethod
    def parse(cls, raw: bytes) -> Claim:
        parts = raw.decode(errors="replace").split(" ")
        at = parts[2] if len(parts) > 2 else ""
        return cls(
            raw, parts[0], parts[1] if len(parts) > 1 else "", int(at) if at.isdigit() else None
        )


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
    now_ms = int(time.time() * 1000)
    claims = [f"{item.id} {fp} {now_ms}" for (_, item), fp in zip(keyed, prints, strict=True)]
    try:
        with get_redis(settings.redis_url).pipeline(transaction=False) as pipe:
            for (_, item), claim in zip(keyed, claims, strict=True):
                pipe.set(
                    names.idempotency(item.request["idempotency_key"]),
                    claim,
                    nx=True,
                    ex=IDEMPOTENCY_TTL_S,
                    get=True,
                )
            previous = pipe.execute()
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise redis_down(settings) from err
    skip: set[int] = set()
    mine: dict[str, tuple[IntakeItem, str]] = {}  # the keys this call holds
    held: list[tuple[int, IntakeItem, str, Claim]] = []  # the same request's, by another call
    conflict: IdempotencyConflict | None = None
    ours = {item.id for _, item in keyed}
    for (index, item), fp, prior, claim in zip(keyed, prints, previous, claims, strict=True):
        key = item.request["idempotency_key"]
        first_claim = Claim.parse(prior) if prior is not None else None
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
    if conflict is None and held:
        conflict = _answer_held(settings, held, ids, skip, mine)
    if conflict is not None:
        release_claims([item for item, _ in mine.values()], settings)
        raise conflict
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
    # the first id is answered at once, as ids are there. So is a claim with no time (older).
    timed = settings.producer_writes_rows
    recorded = (
        _recorded(settings, [c.id for _, _, _, c in held if c.at_ms is not None])
        if timed
        else set()
    )
    now_ms = int(time.time() * 1000)
    for index, item, claim, first in held:
        if not timed or first.at_ms is None or first.id in recorded:
            ids[index] = first.id
            skip.add(index)
            continue
        key = item.request["idempotency_key"]
        if now_ms - first.at_ms < STALE_CLAIM_S * 1000 or not _take_over(
            settings, key, first, claim
        ):
            return IdempotencyConflict(key, first.id, in_progress=True)
        mine[key] = (item, claim.split(" ")[1])
    return None


def _recorded(settings: Settings, request_ids: Sequence[str]) -> set[str]:
    if not request_ids:
        return set()
    try:
        with session_scope(settings.database_url) as session:
            return set(session.scalars(select(Request.id).where(Request.id.in_(request_ids))))
    except TRANSIENT as err:
        raise ServiceUnavailable(
            "the database", redact_url(settings.database_url), DATABASE_HINT
        ) from err


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
    """Let go of the keys these items claimed (their submit sent nothing)."""
    names = [
        keys.of(settings).idempotency(item.request["idempotency_key"])
        for item in items
        if item.request.get("idempotency_key")
    ]
    if names:
        with contextlib.suppress(redis.RedisError):
            get_redis(settings.redis_url).delete(*names)


def redis_down(settings: Settings) -> ServiceUnavailable:
    return ServiceUnavailable("Redis", redact_url(settings.redis_url), REDIS_HINT)
