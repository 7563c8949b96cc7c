"""What a stream job uses of its process's runtime, as a protocol: the job depends on these
few services, not on the runtime that provides them (streaming/runtime.py)."""

from __future__ import annotations

from decimal import Decimal
from typing import Protocol

from core.settings import Settings
from streaming.call_limits import SpendLimit
from streaming.provider_calls import ProviderClients
from streaming.publisher import Publisher


class JobServices(Protocol):
    """The runtime as a job sees it."""

    settings: Settings
    publisher: Publisher  # the batching publisher of the replay logs
    providers: ProviderClients  # each provider's client and shared rate limit

    async def spend_limit(self, request_id: str, needed: Decimal) -> SpendLimit | None:
        """The request's cost cap or budget hold (grown toward `needed`), the tighter (None:
        neither, or unread)."""
        ...
