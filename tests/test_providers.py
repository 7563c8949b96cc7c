"""Providers as configuration: the model map, keys from the environment, `auto` batch mode."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from core.providers import load_providers, resolve_batch_mode
from core.settings import Settings

FILE = """
[providers.main]
base_url = "{main}"
api_key_env = "MAIN_KEY"
models = ["gpt-4.1", "sheepdog-mini"]
batch_mode = "auto"
requests_per_minute = 600

[providers.relay]
base_url = "{relay}"
api_key_env = "RELAY_KEY"
models = ["deepseek-v3.2"]
batch_mode = "auto"
tokens_per_minute = 100000
batch_discount = 0

[providers.rest]
base_url = "{main}"
"""


@pytest.fixture
def providers_file(tmp_path: Path, simulator, simulator_factory, monkeypatch):  # type: ignore[no-untyped-def]
    with simulator_factory(no_batch_api=True, api_key="sk-relay") as relay:
        path = tmp_path / "providers.toml"
        path.write_text(FILE.format(main=simulator.base_url, relay=relay.base_url))
        monkeypatch.setenv("MAIN_KEY", simulator.api_key)
        monkeypatch.setenv("RELAY_KEY", "sk-relay")
        yield path


def test_model_map_and_keys(providers_file: Path) -> None:
    providers = load_providers(Settings(providers_file=str(providers_file)))
    assert providers.for_model("gpt-4.1").name == "main"
    assert providers.for_model("deepseek-v3.2").name == "relay"
    assert providers.for_model("claude-sonnet-4.5").name == "rest"  # the catch-all
    relay = providers.get("relay")
    assert relay.key() == "sk-relay" and relay.tokens_per_minute == 100_000
    assert "sk-relay" not in repr(relay) and "sk-relay" not in relay.model_dump_json()


def test_auto_batch_mode_is_probed_once_and_remembered(
    providers_file: Path, redis_url: str
) -> None:
    from core import keys
    from core.redis_conn import get_redis

    settings = Settings(providers_file=str(providers_file), redis_url=redis_url)
    providers = load_providers(settings)
    main = providers.get("main").model_copy(update={"name": f"main-{uuid.uuid4().hex[:6]}"})
    relay = providers.get("relay").model_copy(update={"name": f"relay-{uuid.uuid4().hex[:6]}"})
    assert resolve_batch_mode(main, settings) == "native"
    assert resolve_batch_mode(relay, settings) == "emulated"
    assert (
        get_redis(redis_url).get(keys.of(settings).provider_batch_mode(relay.name, relay.base_url))
        == b"emulated"
    )


@pytest.mark.unit
def test_default_provider_from_settings() -> None:
    settings = Settings(openai_base_url="http://127.0.0.1:1/v1", openai_api_key="sk-x")
    provider = load_providers(settings).for_model("anything")
    assert (provider.name, provider.base_url, provider.key()) == (
        "default",
        "http://127.0.0.1:1/v1",
        "sk-x",
    )


def test_redis_away_stops_an_auto_probe_before_the_provider_is_asked(
    providers_file: Path,
) -> None:
    """The probe's answer could not be kept: the flush must not ask the provider every time."""
    import redis

    from core.providers import known_batch_mode

    settings = Settings(providers_file=str(providers_file), redis_url="redis://127.0.0.1:1/0")
    unreachable = (
        load_providers(settings)
        .get("relay")
        .model_copy(
            update={"base_url": "http://127.0.0.1:1/v1"}  # asked, it would fail otherwise (slowly)
        )
    )
    assert known_batch_mode(unreachable, settings) is None  # submit: the table's rate
    with pytest.raises(redis.RedisError):
        resolve_batch_mode(unreachable, settings)


def test_a_producer_prices_the_batch_lane_at_the_probe_s_answer_within_a_refresh(
    providers_file: Path, redis_url: str
) -> None:
    """Submit reads an `auto` provider's remembered probe answer, at most REFRESH_S old."""
    from core import keys
    from core.redis_conn import get_redis
    from costs.provider_prices import REFRESH_S, ProviderPrices
    from rules.prices import load_price_table

    settings = Settings(
        providers_file=str(providers_file),
        redis_url=redis_url,
        broker_prefix=f"t-prices-{uuid.uuid4().hex[:6]}:",  # a probe memory of its own
    )
    main = load_providers(settings).get("main")
    table = load_price_table()
    standard, half = table.get("gpt-4.1").rates("stream"), table.get("gpt-4.1").rates("batch")
    assert half != standard
    now = [0.0]
    prices = ProviderPrices(settings, clock=lambda: now[0])
    # `relay` sets its own batch_discount 0; `main` (auto) is not probed yet: the table's rate.
    assert prices.get(table).get("deepseek-v3.2").rates("batch") == (
        table.get("deepseek-v3.2").rates("stream")
    )
    assert prices.get(table).get("gpt-4.1").rates("batch") == half
    name = keys.of(settings).provider_batch_mode(main.name, main.base_url)
    get_redis(redis_url).set(name, "emulated", ex=60)  # a flush's probe found no Batch API
    try:
        now[0] = REFRESH_S - 1
        assert prices.get(table).get("gpt-4.1").rates("batch") == half  # kept a minute
        now[0] = REFRESH_S + 1
        assert prices.get(table).get("gpt-4.1").rates("batch") == standard
    finally:
        get_redis(redis_url).delete(name)
