"""Every Redis key and channel name Sheepdog uses, built in one place.

Every name starts with the deployment's prefix (SHEEPDOG_BROKER_PREFIX, the one Celery's own
keys get), so deployments sharing one Redis database never read or write each other's state;
no prefix keeps the names of DESIGN.md (`sheepdog:stream:{id}`, ...). Get the names of a
deployment with `keys.of(settings)`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.settings import Settings

PREFIX = "sheepdog"


@dataclass(frozen=True)
class Keys:
    """The key and channel names of one deployment (`deployment`: its broker prefix)."""

    deployment: str = ""

    @property
    def base(self) -> str:
        return f"{self.deployment}{PREFIX}"

    def stream_channel(self, request_id: str) -> str:
        """Pub/sub channel carrying a streaming request's messages."""
        return f"{self.base}:stream:{request_id}"

    def replay_log(self, request_id: str) -> str:
        """Redis stream holding the same messages, for late subscribers (with a TTL)."""
        return f"{self.base}:replay:{request_id}"

    def stream_fence(self, request_id: str) -> str:
        """Which attempt of a stream may publish and its next seq (streaming/deliver.lua); kept
        as long as the replay log."""
        return f"{self.base}:fence:{request_id}"

    def request_owner(self, request_id: str) -> str:
        """Set by the HTTP front door when it submits a request: the tenant that owns it and
        what it was, until its row exists (`GET /v1/requests/{id}` answers from it before)."""
        return f"{self.base}:owner:{request_id}"

    def webhook_slot(self, target: str, slot: int) -> str:
        """One of an endpoint's delivery slots (a lock with a TTL): bounds deliveries in flight
        to one endpoint across every worker."""
        return f"{self.base}:webhooks:slot:{target}:{slot}"

    def webhook_tenant_slot(self, tenant: str, slot: int) -> str:
        """One of a tenant's delivery slots: bounds the deliveries in flight to all of one
        tenant's receivers across every worker."""
        return f"{self.base}:webhooks:tenant-slot:{tenant}:{slot}"

    @property
    def webhook_kick(self) -> str:
        """Set for a few milliseconds when a commit asks for a delivery sweep (one a window)."""
        return f"{self.base}:webhooks:kick"

    def stream_trace(self, request_id: str) -> str:
        """A stream's stage times, written only when SHEEPDOG_STREAM_TRACE is set (benchmarks)."""
        return f"{self.base}:trace:{request_id}"

    def idempotency(self, key: str) -> str:
        """Maps a caller's idempotency key to the first request submitted with it."""
        return f"{self.base}:idem:{key}"

    def cancel_flag(self, request_id: str) -> str:
        """Set when a caller cancels a request; workers check it before and while streaming."""
        return f"{self.base}:cancel:{request_id}"

    def janitor_resent(self, request_id: str) -> str:
        """Set when the janitor resends a stuck queued stream request (once per timeout)."""
        return f"{self.base}:resent:{request_id}"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel announcing cancellations to every stream worker (payload: id)."""
        return f"{self.base}:cancel"

    @property
    def janitor_lock(self) -> str:
        return f"{self.base}:lock:janitor"

    @property
    def documents_lock(self) -> str:
        return f"{self.base}:lock:documents"

    @property
    def metrics_stream_mark(self) -> str:
        return f"{self.base}:metrics:stream-mark"

    @property
    def queued_low_count(self) -> str:
        """Low-priority requests queued since the last flush (the threshold trigger)."""
        return f"{self.base}:queued:low"

    def batch_job_lock(self, job_id: str) -> str:
        """Held while one process submits or ingests a batch job (so no one does it twice)."""
        return f"{self.base}:lock:batch:{job_id}"

    def provider_batch_mode(self, provider: str, base_url: str | None) -> str:
        """What `auto` found out about a provider's Batch API (native or emulated). Keyed by
        the base URL it describes too: a provider renamed or moved to another URL asks again."""
        where = hashlib.sha256((base_url or "").encode()).hexdigest()[:16]
        return f"{self.base}:provider:{provider}:{where}:batch_mode"

    def rate_limit(self, provider: str, kind: str) -> str:
        """GCRA state (theoretical arrival time) of a provider's requests or tokens limit."""
        return f"{self.base}:ratelimit:{provider}:{kind}"

    def emulated(self, job_id: str, part: str) -> str:
        """State of an emulated batch job: `lines` (the output "file", a list), `done`
        (custom_ids with a line), `counts`, `heartbeat` (owner token with a TTL), `kick`
        (poll's resend mark)."""
        return f"{self.base}:emulated:{job_id}:{part}"


@lru_cache(maxsize=64)
def _keys(deployment: str) -> Keys:
    return Keys(deployment)


def of(settings: Settings) -> Keys:
    """The names of `settings`' deployment."""
    return _keys(settings.broker_prefix)
