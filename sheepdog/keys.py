"""Every Redis key and channel name Sheepdog uses, built in one place."""

from __future__ import annotations

PREFIX = "sheepdog"


def stream_channel(request_id: str) -> str:
    """Pub/sub channel carrying a streaming request's messages."""
    return f"{PREFIX}:stream:{request_id}"


def replay_log(request_id: str) -> str:
    """Redis stream holding the same messages, for late subscribers (expires after replay_ttl_s)."""
    return f"{PREFIX}:replay:{request_id}"


def stream_trace(request_id: str) -> str:
    """A stream's stage times, written only when SHEEPDOG_STREAM_TRACE is set (benchmarks)."""
    return f"{PREFIX}:trace:{request_id}"


def idempotency(key: str, deployment: str = "") -> str:
    """Maps a caller's idempotency key to the first request id submitted with it. `deployment`
    (the broker prefix) keeps deployments that share one Redis database apart."""
    return f"{deployment}{PREFIX}:idem:{key}"


def cancel_flag(request_id: str) -> str:
    """Set when a caller cancels a request; workers check it before and while streaming."""
    return f"{PREFIX}:cancel:{request_id}"


def janitor_resent(request_id: str) -> str:
    """Set when the janitor resends a stuck queued stream request (once per timeout)."""
    return f"{PREFIX}:resent:{request_id}"


CANCEL_CHANNEL = f"{PREFIX}:cancel"
"""Pub/sub channel announcing cancellations to every stream worker (payload: request id)."""

FLUSH_LOCK = f"{PREFIX}:lock:flush"
POLL_LOCK = f"{PREFIX}:lock:poll"
JANITOR_LOCK = f"{PREFIX}:lock:janitor"
DOCUMENTS_LOCK = f"{PREFIX}:lock:documents"
METRICS_STREAM_MARK = f"{PREFIX}:metrics:stream-mark"
QUEUED_LOW_COUNT = f"{PREFIX}:queued:low"


def batch_job_lock(job_id: str) -> str:
    """Held while one process submits or ingests a batch job (so no one does it twice)."""
    return f"{PREFIX}:lock:batch:{job_id}"


def provider_batch_mode(provider: str) -> str:
    """What `auto` found out about a provider's Batch API: native or emulated."""
    return f"{PREFIX}:provider:{provider}:batch_mode"


def rate_limit(provider: str, kind: str) -> str:
    """GCRA state (theoretical arrival time) of a provider's requests or tokens limit."""
    return f"{PREFIX}:ratelimit:{provider}:{kind}"


def emulated(job_id: str, part: str) -> str:
    """State of an emulated batch job: `lines` (the output "file", a list), `done` (custom_ids
    with a line), `counts`, `heartbeat` (owner token with a TTL), `kick` (poll's resend mark)."""
    return f"{PREFIX}:emulated:{job_id}:{part}"


def webhook_slot(target: str, slot: int, deployment: str = "") -> str:
    """One of an endpoint's delivery slots (a lock with a TTL): bounds deliveries in flight
    to one endpoint across every worker."""
    return f"{deployment}{PREFIX}:webhooks:slot:{target}:{slot}"


def webhook_kick(deployment: str = "") -> str:
    """Set for a few milliseconds when a commit asks for a delivery sweep (one sweep a window)."""
    return f"{deployment}{PREFIX}:webhooks:kick"
