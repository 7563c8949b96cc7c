"""Tenant API keys of the HTTP front door: made, listed, revoked, and looked up by hash.

A key is `sk-sd-` and 43 random URL-safe characters (256 bits). Only its SHA-256 is stored: a
key that random needs no slow hash, and a lookup by hash is one index probe. The stored hash is
compared again in constant time. Keys are printed once, by `sheepdog keys create`, and never
logged (their `sk-` shape is one the log scrubber masks).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from core.db import session_scope
from core.errors import DATABASE_HINT, InvalidRequest, ServiceUnavailable, redact_url
from models.request import check_tenant
from models.tables import DOCUMENTS_TENANT, INTEGER_MAX, ApiKey, utcnow

KEY_PREFIX = "sk-sd-"
SHOWN_CHARS = 12  # what `keys list` shows of a key: enough to tell keys apart


@dataclass(frozen=True)
class KeyInfo:
    """What a key grants: the tenant it speaks for and its own rate limit."""

    id: str
    tenant: str
    name: str
    prefix: str
    rate_limit_per_minute: int | None
    created_at: datetime
    revoked_at: datetime | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        row.id,
        row.tenant,
        row.name,
        row.prefix,
        row.rate_limit_per_minute,
        row.created_at,
        row.revoked_at,
    )


def _db_down(url: str) -> ServiceUnavailable:
    return ServiceUnavailable("the database", redact_url(url), DATABASE_HINT)


def create_key(
    database_url: str, tenant: str, name: str = "", rate_limit_per_minute: int | None = None
) -> tuple[str, KeyInfo]:
    """A new key for `tenant`: (the key, shown once; what is stored)."""
    tenant = tenant.strip()
    check_tenant(tenant)
    if tenant == DOCUMENTS_TENANT:
        raise InvalidRequest(
            f"the tenant {DOCUMENTS_TENANT!r} is the nightly document job's: choose another name"
        )
    if len(name) > 100:
        raise InvalidRequest("the key's name must be at most 100 characters")
    if rate_limit_per_minute is not None and not 0 < rate_limit_per_minute <= INTEGER_MAX:
        raise InvalidRequest(
            f"the rate limit must be 1 to {INTEGER_MAX:,} a minute, got {rate_limit_per_minute}"
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id="key_" + secrets.token_hex(8),
        tenant=tenant,
        name=name,
        key_hash=hash_key(key),
        prefix=key[:SHOWN_CHARS],
        rate_limit_per_minute=rate_limit_per_minute,
        created_at=utcnow(),
    )
    try:
        with session_scope(database_url) as session:
            session.add(row)
            session.flush()
            return key, _info(row)
    except OperationalError as err:
        raise _db_down(database_url) from err


def list_keys(database_url: str, tenant: str | None = None) -> list[KeyInfo]:
    """Every key (or one tenant's), oldest first; revoked ones included."""
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant == tenant)
    try:
        with session_scope(database_url) as session:
            return [_info(row) for row in session.scalars(stmt)]
    except OperationalError as err:
        raise _db_down(database_url) from err


def revoke_key(database_url: str, key_id: str) -> bool:
    """Revoke a key by its id; False when it was revoked already. InvalidRequest when unknown."""
    try:
        with session_scope(database_url) as session:
            row = session.get(ApiKey, key_id)
            if row is None:
                raise InvalidRequest(f"no key with id {key_id!r} (see: sheepdog keys list)")
            if row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
            return True
    except OperationalError as err:
        raise _db_down(database_url) from err


def find_key(database_url: str, key: str) -> KeyInfo | None:
    """The live (not revoked) key `key`, or None."""
    digest = hash_key(key)
    try:
        with session_scope(database_url) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    except OperationalError as err:
        raise _db_down(database_url) from err
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        return None
    return _info(row)


CACHE_MAX = 10_000  # keys remembered, found and not found each


class KeyCache:
    """find_key() remembered for `ttl_s` seconds per hash (found and not found alike): a call
    costs no database query while its key is cached, and a revoked key stops working within
    `ttl_s`. Thread-safe."""

    def __init__(self, database_url: str, ttl_s: float) -> None:
        self.database_url = database_url
        self.ttl_s = ttl_s
        # Found and not found apart: a flood of made-up keys empties only its own (bounded)
        # cache, never the tenants' keys.
        self._entries: dict[str, tuple[float, KeyInfo | None]] = {}
        self._unknown: dict[str, tuple[float, KeyInfo | None]] = {}
        self._lock = threading.Lock()

    def cached(self, key: str) -> tuple[bool, KeyInfo | None]:
        """(True, what find_key() said) while cached; (False, None) when it must be asked."""
        digest = hash_key(key)
        # One dict read is atomic: no lock on a hit.
        hit = self._entries.get(digest) or self._unknown.get(digest)
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def lookup(self, key: str) -> KeyInfo | None:
        """find_key(), from the cache when it can (may query the database: blocking)."""
        known, info = self.cached(key)
        if known:
            return info
        digest = hash_key(key)
        now = time.monotonic()
        info = find_key(self.database_url, key)
        if self.ttl_s > 0:
            with self._lock:
                entries, other = (
                    (self._entries, self._unknown)
                    if info is not None
                    else (self._unknown, self._entries)
                )
                other.pop(digest, None)  # a key revoked (or made) since
                if len(entries) > CACHE_MAX:  # bounded: random bad keys cannot grow it
                    entries.clear()
                entries[digest] = (now + self.ttl_s, info)
        return info
