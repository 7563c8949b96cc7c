"""Delivery slots: Redis locks with a TTL, shared by every worker, that bound the deliveries
in flight to one target (an endpoint, or one request-level URL) and to one tenant.

A run holds one of its tenant's slots and one of its target's, or none and exits at once. The
target's slots keep a slow receiver from being sent to by every worker; the tenant's keep a
tenant with many slow receivers from holding every worker thread while other tenants wait. A
slot lives for one send and is renewed before each, so a worker that dies holding one frees
it within a send's time, not a whole batch's."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import redis

from core import keys
from core.settings import Settings


def _name(text: str) -> str:
    # Long names (URLs, tenants) are hashed: a key stays short whatever the caller registered.
    return text if len(text) <= 64 else hashlib.sha256(text.encode()).hexdigest()


def _first_free(client: Any, names: list[str], ttl_s: float) -> Any:
    for name in names:
        lock = client.lock(name, timeout=ttl_s)
        if lock.acquire(blocking=False):
            return lock
    return None


class Slots:
    """The slots one delivery run holds."""

    def __init__(self, locks: list[Any]) -> None:
        self._locks = locks

    def renew(self) -> bool:
        """Extend every slot for one more send; False when one expired (this process stalled,
        and another run may hold it now)."""
        try:
            for lock in self._locks:
                lock.reacquire()
            return True
        except redis.exceptions.LockError:
            return False

    def release(self) -> None:
        for lock in self._locks:
            with contextlib.suppress(redis.exceptions.LockError):  # expired: maybe retaken
                lock.release()


def take(settings: Settings, target: str, tenant: str | None, ttl_s: float) -> Slots | None:
    """One of `tenant`'s slots (when given) and one of `target`'s, or None when either kind
    is all taken."""
    from core.redis_conn import get_redis

    client = get_redis(settings.redis_url)
    names = keys.of(settings)
    held: list[Any] = []
    if tenant is not None:
        count = max(1, settings.webhook_tenant_concurrency)
        lock = _first_free(
            client, [names.webhook_tenant_slot(_name(tenant), n) for n in range(count)], ttl_s
        )
        if lock is None:
            return None
        held.append(lock)
    count = max(1, settings.webhook_endpoint_concurrency)
    lock = _first_free(client, [names.webhook_slot(_name(target), n) for n in range(count)], ttl_s)
    if lock is None:
        Slots(held).release()
        return None
    return Slots([*held, lock])
