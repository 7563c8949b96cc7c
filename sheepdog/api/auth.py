"""Who is calling: the tenant behind `Authorization: Bearer <key>`, and its key's rate limit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from core import keys
from core.ratelimit import AsyncRateLimiter, RateLimits
from core.settings import Settings
from models.tables import DEFAULT_TENANT, DOCUMENTS_TENANT
from sheepdog.api.errors import ApiError
from sheepdog.tenant_keys import KeyCache, KeyInfo

NO_AUTH_TENANT = DEFAULT_TENANT


@dataclass(frozen=True)
class Principal:
    """The caller: its tenant and the key it used (None with --no-auth)."""

    tenant: str
    key_id: str | None


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401, message, "invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="sheepdog"'}
    )


def bearer_token(request: Request, allow_query: bool = False) -> str:
    """The key of `Authorization: Bearer <key>`; with `allow_query`, else of ?access_token=
    (a browser's EventSource cannot send headers; the access log masks it)."""
    header = request.headers.get("authorization", "")
    if not header and allow_query and request.query_params.get("access_token"):
        return request.query_params["access_token"].strip()
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing API key: send Authorization: Bearer <key>")
    return token.strip()


class Authenticator:
    """Checks keys (cached for settings.api_key_cache_s) and their per-key rate limits."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, no_auth: bool) -> None:
        self.settings = settings
        self.no_auth = no_auth
        self.keys = KeyCache(settings.database_url, settings.api_key_cache_s)
        self._redis = redis
        self._limiters: dict[str, AsyncRateLimiter] = {}
        self._lookups: dict[str, asyncio.Future[KeyInfo | None]] = {}

    async def principal(self, request: Request, allow_query: bool = False) -> Principal:
        """The caller, or ApiError 401 (no or unknown or revoked key) / 429 (over its rate)."""
        if self.no_auth:
            return Principal(NO_AUTH_TENANT, None)
        token = bearer_token(request, allow_query)
        known, info = self.keys.cached(token)
        if not known:
            info = await self._lookup(token)
        if info is None:
            raise _unauthorized("invalid API key")
        if info.tenant == DOCUMENTS_TENANT:  # a key made before that tenant was refused
            raise _unauthorized("this key's tenant is the nightly document job's; make another")
        await self._check_rate(info)
        return Principal(info.tenant, info.id)

    async def _lookup(self, token: str) -> KeyInfo | None:
        """The database's answer for `token`, asked once however many calls wait for it (when
        the cache entry of a busy key expires, its calls would otherwise each query at once)."""
        pending = self._lookups.get(token)
        if pending is None:
            pending = asyncio.ensure_future(run_in_threadpool(self.keys.lookup, token))
            self._lookups[token] = pending
            pending.add_done_callback(lambda _: self._lookups.pop(token, None))
        return await asyncio.shield(pending)

    async def _check_rate(self, info: KeyInfo) -> None:
        rpm = info.rate_limit_per_minute or self.settings.api_rate_limit_per_minute
        if not rpm:
            return
        limiter = self._limiters.get(info.id)
        if limiter is None or limiter.limits.requests_per_minute != rpm:
            limits = RateLimits(rpm, None, burst=self.settings.api_rate_limit_burst)
            limiter = AsyncRateLimiter(
                self._redis, f"api-key:{info.id}", limits, keys.of(self.settings)
            )
            self._limiters[info.id] = limiter
        wait = await limiter.try_acquire(0)
        if wait > 0:
            seconds = max(1, int(wait + 0.999))
            raise ApiError(
                429,
                f"rate limit of this key ({rpm} requests a minute) reached; retry in {seconds}s",
                "rate_limit_exceeded",
                headers={"Retry-After": str(seconds)},
            )
