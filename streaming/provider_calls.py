"""Which provider a stream calls, and its shared rate limit.

The provider of a request's model gives the client (the runtime's own for the implicit
`default` provider, else one AsyncOpenAI per provider on the runtime's loop) and, when the
provider has limits, the Redis-shared limiter every call attempt acquires first (one request
plus the prompt estimate and the answer limit). A 429's Retry-After penalizes the limiter, so
every worker on every host backs off together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx2
import openai

from core.providers import load_providers
from core.ratelimit import AsyncRateLimiter, Limits
from rules.tokens import count_message_tokens
from streaming.provider_stream import Fatal, Retryable

if TYPE_CHECKING:
    from streaming.runtime import Runtime

DEFAULT_ANSWER_TOKENS = 1024  # token estimate of a request without max_tokens


@dataclass(frozen=True)
class Access:
    client: openai.AsyncOpenAI
    limiter: AsyncRateLimiter | None


def access(runtime: Runtime, model: str) -> Access:
    """The client and limiter for `model` (made once per runtime and provider)."""
    cache: dict[str, Access] = runtime.__dict__.setdefault("_provider_access", {})
    found = cache.get(model)
    if found is not None:
        return found
    settings = runtime.settings
    try:
        provider = load_providers(settings).for_model(model)
    except KeyError as err:
        raise Fatal(str(err.args[0])) from None
    by_name = cache.get(f"provider:{provider.name}")
    if by_name is None:
        if provider.name == "default" and not settings.providers_file:
            client = runtime.openai
        else:
            from streaming.runtime import MAX_CONNECTIONS

            limits = httpx2.Limits(
                max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS
            )
            client = openai.AsyncOpenAI(  # as the runtime's own client (streaming/runtime.py)
                api_key=provider.key(),
                base_url=provider.base_url,
                timeout=provider.timeout_s,
                max_retries=0,  # streaming/job.py owns the retries
                http_client=openai.DefaultAioHttpClient(limits=limits, timeout=provider.timeout_s),
            )
        limiter = None
        if provider.rate_limited:
            rates = Limits(provider.requests_per_minute, provider.tokens_per_minute)
            limiter = AsyncRateLimiter(runtime.redis, provider.name, rates, runtime.names)
        by_name = cache[f"provider:{provider.name}"] = Access(client, limiter)
    cache[model] = by_name
    return by_name


async def before_call(runtime: Runtime, body: dict[str, Any]) -> openai.AsyncOpenAI:
    """Wait for the provider's rate limit (if any); the client to call."""
    found = access(runtime, str(body.get("model") or ""))
    if found.limiter is not None:
        answer = body.get("max_completion_tokens") or body.get("max_tokens")
        tokens = count_message_tokens(body.get("messages") or [])
        await found.limiter.acquire(tokens + int(answer or DEFAULT_ANSWER_TOKENS))
    return found.client


async def after_retryable(runtime: Runtime, body: dict[str, Any], err: Retryable) -> None:
    """A failed attempt that named a Retry-After holds back every worker's calls for it."""
    found = access(runtime, str(body.get("model") or ""))
    if found.limiter is not None and err.retry_after is not None:
        await found.limiter.penalize(err.retry_after)
