"""Providers as configuration: named OpenAI-compatible endpoints, the models each serves, its Batch
API mode and rate limits, and the model -> provider map.

Without SHEEPDOG_PROVIDERS_FILE there is one provider, `default`, from SHEEPDOG_OPENAI_BASE_URL and
SHEEPDOG_OPENAI_API_KEY, serving every model. A file looks like:

    [providers.openai]
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"        # the key's environment variable; keys are not in files
    models = ["gpt-4.1", "gpt-4.1-mini"]
    batch_mode = "native"                 # native | emulated | auto
    requests_per_minute = 500
    tokens_per_minute = 300000

    [providers.relay]
    base_url = "https://relay.example/v1"
    api_key_env = "RELAY_KEY"
    models = ["deepseek-v3.2"]
    batch_mode = "auto"                   # probe once: a 404 on /v1/batches means emulated
    batch_discount = 0                    # the relay bills batch lines at the standard rate

`service_tiers` lists the tiers a provider sells besides the standard one ("flex", "priority");
the default is none, so a relay keeps the stream and batch lanes only. The implicit provider
takes them from SHEEPDOG_OPENAI_SERVICE_TIERS (comma-separated).
"""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

import openai
import redis
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from core.settings import Settings, get_settings

BatchMode = Literal["native", "emulated", "auto"]
ServiceTier = Literal["flex", "priority"]


class ProviderConfig(BaseModel):
    """One OpenAI-compatible endpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    base_url: str | None = None
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    api_key_env: str | None = None
    models: tuple[str, ...] = ()  # empty: every model not claimed by another provider
    batch_mode: BatchMode = "auto"
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    batch_discount: Decimal | None = Field(default=None, ge=0, le=1)
    service_tiers: tuple[ServiceTier, ...] = ()  # none: the stream and batch lanes only
    timeout_s: float = 60.0

    def key(self) -> str:
        """The API key: from the named environment variable, else the inline secret."""
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return "sk-unset"

    @property
    def rate_limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)


class Providers(BaseModel):
    """Every configured provider and the model map."""

    model_config = ConfigDict(frozen=True)

    providers: tuple[ProviderConfig, ...]

    def for_model(self, model: str) -> ProviderConfig:
        """The provider serving `model` (a provider with an empty model list takes the rest)."""
        fallback = None
        for provider in self.providers:
            if model in provider.models:
                return provider
            if not provider.models and fallback is None:
                fallback = provider
        if fallback is None:
            raise KeyError(f"no provider serves model {model!r}")
        return fallback

    def get(self, name: str) -> ProviderConfig:
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(f"unknown provider {name!r}")


def tiers_for(model: str, settings: Settings | None = None) -> frozenset[str]:
    """The service tiers the provider of `model` sells (empty when none serves it)."""
    try:
        return frozenset(load_providers(settings).for_model(model).service_tiers)
    except KeyError:
        return frozenset()


def parse_providers_file(path: Path, settings: Settings) -> Providers:
    raw = tomllib.loads(path.read_text())
    entries = raw.get("providers", {})
    if not entries:
        raise ValueError(f"providers file {path} names no providers")
    return Providers(
        providers=tuple(
            ProviderConfig.model_validate(
                {"timeout_s": settings.provider_timeout_s, **entry, "name": name}
            )
            for name, entry in entries.items()
        )
    )


def default_providers(settings: Settings) -> Providers:
    """The one implicit provider from SHEEPDOG_OPENAI_BASE_URL / _API_KEY."""
    return Providers(
        providers=(
            ProviderConfig(
                name="default",
                base_url=settings.openai_base_url,
                api_key=settings.openai_api_key,
                batch_mode=settings.default_batch_mode,  # type: ignore[arg-type]
                service_tiers=tuple(  # type: ignore[arg-type]
                    t.strip() for t in settings.openai_service_tiers.split(",") if t.strip()
                ),
                timeout_s=settings.provider_timeout_s,
            ),
        )
    )


def load_providers(settings: Settings | None = None) -> Providers:
    """The providers for `settings` (cached per file)."""
    settings = settings or get_settings()
    if settings.providers_file:
        return _cached_file(settings.providers_file, settings.provider_timeout_s)
    return default_providers(settings)


@lru_cache(maxsize=4)
def _cached_file(path: str, timeout_s: float) -> Providers:
    return parse_providers_file(Path(path), Settings(provider_timeout_s=timeout_s))


@lru_cache(maxsize=32)
def _client(base_url: str | None, key: str, timeout: float) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)


def client_for(provider: ProviderConfig) -> openai.OpenAI:
    """A shared sync SDK client for `provider` (SDK retries off: the paths own retries)."""
    return _client(provider.base_url, provider.key(), provider.timeout_s)


def async_client_for(provider: ProviderConfig) -> openai.AsyncOpenAI:
    """A new async SDK client for `provider` (SDK retries off: the paths own retries); make one
    per event loop."""
    return openai.AsyncOpenAI(
        base_url=provider.base_url,
        api_key=provider.key(),
        timeout=provider.timeout_s,
        max_retries=0,
    )


def known_batch_mode(provider: ProviderConfig, settings: Settings | None = None) -> str | None:
    """`native` or `emulated` as far as known without asking the provider: the configured mode,
    or for `auto` the probe's remembered answer (None: not probed yet, or Redis away)."""
    try:
        return _remembered_mode(provider, settings)
    except redis.RedisError:
        return None


def _remembered_mode(provider: ProviderConfig, settings: Settings | None) -> str | None:
    """`known_batch_mode`, a Redis error raised."""
    if provider.batch_mode != "auto":
        return provider.batch_mode
    from core import keys
    from core.redis_conn import get_redis

    settings = settings or get_settings()
    name = keys.of(settings).provider_batch_mode(provider.name, provider.base_url)
    known = get_redis(settings.redis_url).get(name)
    if not known:
        return None
    return known.decode() if isinstance(known, bytes) else str(known)


def resolve_batch_mode(provider: ProviderConfig, settings: Settings | None = None) -> str:
    """`native` or `emulated`. For `auto`, ask the provider once (a 404 on /v1/batches means it
    has no Batch API) and remember the answer in Redis for a day, for every worker. Redis away
    raises before the provider is asked (its answer could not be kept)."""
    known = _remembered_mode(provider, settings)
    if known is not None:
        return known
    from core import keys
    from core.redis_conn import get_redis

    settings = settings or get_settings()
    r = get_redis(settings.redis_url)
    name = keys.of(settings).provider_batch_mode(provider.name, provider.base_url)
    try:
        client_for(provider).batches.list(limit=1)
        mode = "native"
    except openai.NotFoundError:
        mode = "emulated"
    r.set(name, mode, ex=24 * 3600)
    return mode
