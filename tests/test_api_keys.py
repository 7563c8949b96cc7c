"""`sheepdog keys create|list|revoke` on SQLite and PostgreSQL: the key printed once, only its
hash stored, never listed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

from core.db import session_scope
from models.tables import ApiKey
from sheepdog.tenant_keys import KEY_PREFIX, find_key
from tests.fixtures.workers import ROOT


def sheepdog(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env["SHEEPDOG_DATABASE_URL"] = db_url
    return subprocess.run(
        [sys.executable, "-m", "sheepdog", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keys_create_list_revoke(db_url: str) -> None:
    made = sheepdog(db_url, "keys", "create", "--tenant", "acme", "--name", "billing")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith(KEY_PREFIX) and len(key) >= 40 and "\n" not in key
    info = find_key(db_url, key)
    assert info is not None and info.tenant == "acme" and info.name == "billing"
    with session_scope(db_url) as session:
        row = session.scalars(select(ApiKey).where(ApiKey.id == info.id)).one()
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
        stored = " ".join(str(v) for v in vars(row).values())
    assert key not in stored  # only the hash and the first characters
    listed = sheepdog(db_url, "keys", "list", "--tenant", "acme", "--json")
    assert listed.returncode == 0 and info.id in listed.stdout and key not in listed.stdout
    assert sheepdog(db_url, "keys", "revoke", info.id).stdout.strip() == "revoked"
    assert sheepdog(db_url, "keys", "revoke", info.id).stdout.strip() == "already revoked"
    assert find_key(db_url, key) is None
    assert '"state": "revoked"' in sheepdog(db_url, "keys", "list", "--json").stdout
    unknown = sheepdog(db_url, "keys", "revoke", "key_nope")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "no key with id 'key_nope'" in unknown.stderr
    bad = sheepdog(db_url, "keys", "create", "--tenant", "x" * 101)
    assert bad.returncode == 2 and "1 to 100 characters" in bad.stderr


def test_made_up_keys_never_push_a_tenants_key_out_of_the_cache(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found and not-found keys shared one bounded cache, emptied whole when full: a flood of
    made-up keys sent the tenants' keys back to the database on every call. A key revoked
    after it was cached is not found once its entry expires."""
    import uuid

    from sheepdog import tenant_keys
    from sheepdog.tenant_keys import KeyCache, create_key, revoke_key

    monkeypatch.setattr(tenant_keys, "CACHE_MAX", 5)
    key, info = create_key(db_url, f"cached-{uuid.uuid4().hex[:8]}")
    cache = KeyCache(db_url, ttl_s=600)
    assert cache.lookup(key) == info
    for _ in range(20):
        assert cache.lookup(f"{KEY_PREFIX}{uuid.uuid4().hex}") is None
    assert cache.cached(key) == (True, info)  # no query for it
    short = KeyCache(db_url, ttl_s=0.2)
    assert short.lookup(key) == info
    revoke_key(db_url, info.id)
    time.sleep(0.3)  # past its entry's time
    assert short.lookup(key) is None and short.cached(key) == (True, None)
