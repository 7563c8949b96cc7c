"""Which provider a stream calls, and its shared rate limit.

The provider of a request's model gives the endpoint (its SDK client's chat URL and headers,
sent over one pool of connections per provider on the engine's loop: provider_http.py) and,
when the provider has limits, the Redis-shared limiter every call attempt acquires first (one
request plus the prompt estimate and the answer limit). A 429's Retry-After penalizes the
limiter, so every worker on every host backs off together.
"""

from __future__ import annotations

import logging
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from core import keys
from core.providers import ProviderConfig, async_client_for, load_providers
from core.ratelimit import AsyncRateLimiter, RateLimits
from core.settings import Settings
from rules.tokens import count_message_tokens
from streaming.provider_errors import Fatal, Retryable
from streaming.provider_http import ProviderHttp, Unsendable
from streaming.provider_stream import Endpoint

DEFAULT_ANSWER_TOKENS = 1024  # token estimate of a request without max_tokens
log = logging.getLogger("sheepdog.streaming.providers")


@dataclass(frozen=True)
class Access:
    endpoint: Endpoint
    limiter: AsyncRateLimiter | None


class ProviderClients:
    """The client and limiter of each provider, made once per runtime loop (on that loop)."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, names: keys.Keys) -> None:
        self.settings = settings
        self.redis = redis
        self.names = names
        self._by_model: dict[str, Access] = {}
        self._by_provider: dict[str, Access] = {}

    def warm_up(self) -> None:
        """Make every configured provider's client now rather than at its first stream. A
        providers file that cannot be read is left to each stream to report (it fails with the
        reason) rather than keeping the stream loop from starting."""
        try:
            providers = load_providers(self.settings).providers
        except Exception:
            log.exception("providers could not be loaded; each stream will say why")
            return
        for provider in providers:
            try:
                self._of(provider)
            except Fatal as err:
                log.error("%s; its streams will fail with it", err.reason)

    def access(self, model: str) -> Access:
        """The client and limiter for `model`; Fatal when no provider serves it."""
        found = self._by_model.get(model)
        if found is not None:
            return found
        try:
            provider = load_providers(self.settings).for_model(model)
        except KeyError as err:
            raise Fatal(str(err.args[0])) from None
        found = self._by_model[model] = self._of(provider)
        return found

    def _of(self, provider: ProviderConfig) -> Access:
        """The provider's access; Fatal when its URL or proxy cannot be used (the reason)."""
        found = self._by_provider.get(provider.name)
        if found is None:
            try:
                endpoint = endpoint_for(provider)
            except Unsendable as err:
                raise Fatal(f"provider {provider.name}: {err}") from None
            limiter = None
            if provider.rate_limited:
                rates = RateLimits(provider.requests_per_minute, provider.tokens_per_minute)
                limiter = AsyncRateLimiter(self.redis, provider.name, rates, self.names)
            found = self._by_provider[provider.name] = Access(endpoint, limiter)
        return found

    async def before_call(self, body: dict[str, Any]) -> Endpoint:
        """Wait for the provider's rate limit (if any); the endpoint to call."""
        found = self.access(str(body.get("model") or ""))
        if found.limiter is not None:
            answer = body.get("max_completion_tokens") or body.get("max_tokens")
            tokens = count_message_tokens(body.get("messages") or [])
            await found.limiter.acquire(tokens + int(answer or DEFAULT_ANSWER_TOKENS))
        return found.endpoint

    async def after_retryable(self, body: dict[str, Any], err: Retryable) -> None:
        """A failed attempt that named a Retry-After holds back every worker's calls for it."""
        found = self.access(str(body.get("model") or ""))
        if found.limiter is not None and err.retry_after is not None:
            await found.limiter.penalize(err.retry_after)


def endpoint_for(provider: ProviderConfig) -> Endpoint:
    """`provider`'s endpoint, its connections kept on the running loop. The URL and headers are
    its SDK client's (base URL, auth, the SDK's own headers); the SDK client sends nothing."""
    client = async_client_for(provider)
    headers = {k: v for k, v in client.default_headers.items() if isinstance(v, str)}
    headers.update(client.auth_headers)
    headers.setdefault("Content-Type", "application/json")
    url = f"{client.base_url}chat/completions"
    return Endpoint(ProviderHttp(url, env_proxy(url)), headers)


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTPS_PROXY, NO_PROXY ...: what the SDK's own
    client follows), read once here rather than at every request."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")
