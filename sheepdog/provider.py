"""The provider: official `openai` SDK clients pointed at SHEEPDOG_OPENAI_BASE_URL.

The SDK's own retries are turned off here: each path (streaming, batch) owns its retry policy
so that backoff, `Retry-After` and the attempt count are decided in one place."""

from __future__ import annotations

from functools import lru_cache

import openai

from sheepdog.settings import Settings, get_settings


def _kwargs(settings: Settings) -> dict[str, object]:
    return {
        "api_key": settings.api_key(),
        "base_url": settings.openai_base_url,
        "timeout": settings.provider_timeout_s,
        "max_retries": 0,
    }


@lru_cache(maxsize=8)
def _sync_client(api_key: str, base_url: str | None, timeout: float) -> openai.OpenAI:
    return openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)


def openai_client(settings: Settings | None = None) -> openai.OpenAI:
    """A shared sync client for `settings` (thread-safe; reuses its connection pool)."""
    settings = settings or get_settings()
    return _sync_client(settings.api_key(), settings.openai_base_url, settings.provider_timeout_s)


def async_openai_client(settings: Settings | None = None) -> openai.AsyncOpenAI:
    """A new async client; create one per event loop."""
    settings = settings or get_settings()
    return openai.AsyncOpenAI(**_kwargs(settings))  # type: ignore[arg-type]
