"""What every route handler shares: the tenant client, auth, Redis, metrics and the rounds
(api/batcher.py) of one API process."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

import redis
import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from core.db import check_database
from core.errors import SheepdogError
from core.redis_conn import new_async_redis
from core.settings import Settings
from models.status import Status
from rules.admission import Admitted
from sheepdog.api.auth import Authenticator
from sheepdog.api.batcher import OWNER_ROUND_MAX, Rounds, in_thread, sized
from sheepdog.api.log_hub import LogHub
from sheepdog.api.metrics import ApiMetrics
from sheepdog.api.recent import RecentStreams, keep_for
from sheepdog.api.tenancy import Tenancy
from sheepdog.client import Client

log = logging.getLogger("sheepdog.api")
INLINE_VALIDATION_BYTES = 64 * 1024  # bodies up to this are validated on the event loop


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Front:
    """What every handler shares in one process."""

    def __init__(self, settings: Settings, no_auth: bool) -> None:
        self.settings = settings
        self.client = Client(settings)
        self.tenancy = Tenancy(self.client)
        self.metrics = ApiMetrics()
        self.redis: aioredis.Redis = new_async_redis(settings.redis_url)
        self.logs = LogHub(settings.redis_url, self.redis)  # the event streams' one reader
        self.auth = Authenticator(settings, self.redis, no_auth)
        self.submissions: Rounds[tuple[str, list[Admitted]], list[str]] = Rounds(
            in_thread(self.tenancy.submit_calls), sized
        )
        self.owner_checks: Rounds[tuple[str, str], str | None] = Rounds(
            in_thread(self.tenancy.statuses), max_size=OWNER_ROUND_MAX
        )
        self.recent = RecentStreams(keep_for(settings.replay_ttl_s, settings.replay_done_ttl_s))
        self._ready: tuple[float, dict[str, str]] | None = None

    async def submit(self, tenant: str, items: list[object], as_list: bool, size: int) -> list[str]:
        """Validate (a large body in a thread: token counting is CPU), then enqueue with the
        calls arriving meanwhile (api/batcher.py)."""
        if size > INLINE_VALIDATION_BYTES:
            requests = await run_in_threadpool(self.tenancy.validate, tenant, items, as_list)
        else:
            requests = self.tenancy.validate(tenant, items, as_list)
        ids = await self.submissions.ask((tenant, requests))
        minted = (
            rid
            for rid, a in zip(ids, requests, strict=True)
            if a.request.priority.route == "stream" and not a.request.idempotency_key
        )
        self.recent.add(tenant, minted)
        return ids

    async def stream_status(self, tenant: str, request_id: str) -> str | None:
        """The status of the tenant's own request, for following it (None: not the tenant's);
        a stream this process has just submitted is taken as open, with no lookup."""
        known = self.recent.tenant_of(request_id)
        if known is not None:
            return Status.QUEUED if known == tenant else None
        return await self.owner_checks.ask((tenant, request_id))

    async def readiness(self) -> dict[str, str]:
        """ "ok" or the one-line reason for Redis and the database (cached for a moment)."""
        now = time.monotonic()
        if self._ready is not None and self._ready[0] > now:
            return self._ready[1]
        state: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.redis.ping(), 2.0)
            state["redis"] = "ok"
        except (redis.RedisError, OSError, TimeoutError):
            state["redis"] = "unreachable"
        try:
            await asyncio.wait_for(
                run_in_threadpool(check_database, self.settings.database_url), 5.0
            )
            state["database"] = "ok"
        except (SheepdogError, TimeoutError):
            state["database"] = "unreachable"
        self._ready = (now + self.settings.api_ready_cache_s, state)
        return state
