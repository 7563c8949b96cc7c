"""How a front-door tenant's idempotency keys are stored: under a scope of the tenant's, so that
no tenant's key is another's. The front door scopes what a caller gives; what a tenant reads
back (its views, its webhook payloads) shows the key as it gave it."""

from __future__ import annotations

import hashlib
from functools import lru_cache

from models.tables import DEFAULT_TENANT, max_chars

SCOPE_CHARS = 17  # 16 hex digits of the tenant's SHA-256, and a "/"
KEY_MAX_CHARS = max_chars("idempotency_key") - SCOPE_CHARS  # what the row's column leaves


@lru_cache(maxsize=4096)
def scope(tenant: str) -> str:
    """The prefix of `tenant`'s idempotency keys as stored: the same length for every tenant,
    and no "/" in it (a tenant's name may hold one)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[: SCOPE_CHARS - 1] + "/"


def as_given(tenant: str, key: str | None) -> str | None:
    """A stored key as its tenant gave it (also a key stored before scopes, `<tenant>/<key>`;
    an unscoped one, the in-deployment client's, as it is)."""
    if key and key.startswith(mine := scope(tenant)):
        return key[len(mine) :]
    if key and tenant != DEFAULT_TENANT and key.startswith(tenant + "/"):
        return key[len(tenant) + 1 :]
    return key
