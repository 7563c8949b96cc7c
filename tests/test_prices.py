"""The price table: shipped defaults, override file, exact Decimal arithmetic."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from rules.prices import load_price_table, parse_price_file

pytestmark = pytest.mark.unit  # pure arithmetic and file parsing


def test_defaults_have_the_models_users_name_most() -> None:
    table = load_price_table()
    assert table.get("gpt-4.1").output_per_million == Decimal("8.00")
    assert table.get("claude-sonnet-4.5").output_per_million == Decimal("15.00")
    assert table.get("gemini-2.5-flash").output_per_million == Decimal("2.50")
    assert table.get("deepseek-v3.2").output_per_million == Decimal("0.42")
    assert all(p.batch_discount == Decimal("0.5") for p in table.models.values())
    assert "sheepdog-mini" in table


def test_costs_are_exact_on_both_routes() -> None:
    table = load_price_table()
    # 1,234 in + 567 out on gpt-4.1: 1234*2/1e6 + 567*8/1e6 = 0.002468 + 0.004536
    assert table.cost("gpt-4.1", 1234, 567, "stream") == Decimal("0.007004")
    assert table.cost("gpt-4.1", 1234, 567, "batch") == Decimal("0.003502")


def test_worked_example_ten_million_output_tokens_a_day_saves_forty_dollars() -> None:
    table = load_price_table()
    saved = table.cost("gpt-4.1", 0, 10_000_000, "stream") - table.cost(
        "gpt-4.1", 0, 10_000_000, "batch"
    )
    assert saved == Decimal("40")


def test_override_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        'default_batch_discount = 0.4\n[models."my-model"]\n'
        'input_per_million = 1.1\noutput_per_million = "3.3"\n'
    )
    table = parse_price_file(path)
    assert table.names() == ["my-model"]
    price = table.get("my-model")
    assert price.input_per_million == Decimal("1.1")  # no float noise
    assert price.rates("batch") == (Decimal("0.66"), Decimal("1.98"))
    with pytest.raises(KeyError, match=r"unknown model 'gpt-4\.1'; known models: my-model"):
        table.get("gpt-4.1")


def test_rates_per_tier() -> None:
    table = load_price_table()
    gpt = table.get("gpt-4.1")
    assert gpt.rates("standard") == gpt.rates("stream") == (Decimal("2.00"), Decimal("8.00"))
    assert gpt.rates("batch") == gpt.rates("flex") == (Decimal("1.000"), Decimal("4.000"))
    assert gpt.rates("priority") == (Decimal("3.50"), Decimal("14.00"))
    # No priority rates in the file: the standard ones times the default factor (1.75).
    assert table.get("sheepdog-mini").rates("priority") == (Decimal("0.1750"), Decimal("0.7000"))
    assert table.cost("gpt-4.1", 1_000_000, 1_000_000, "priority") == Decimal("17.50")


def test_flex_discount_and_priority_factor_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        'default_priority_factor = 2\n[models.m]\ninput_per_million = "1"\n'
        'output_per_million = "4"\nflex_discount = 0.25\n'
    )
    price = parse_price_file(path).get("m")
    assert price.rates("flex") == (Decimal("0.75"), Decimal("3.00"))
    assert price.rates("batch") == (Decimal("0.5"), Decimal("2.0"))
    assert price.rates("priority") == (Decimal("2"), Decimal("8"))


def test_served_tier_from_a_response() -> None:
    from rules.prices import served_tier, tier_of

    assert [served_tier(t) for t in ("flex", "priority", "default", "auto", None)] == [
        "flex",
        "priority",
        "standard",
        "standard",
        "standard",
    ]
    assert [tier_of(x) for x in ("stream", "batch", "flex", "priority")] == [
        "standard",
        "batch",
        "flex",
        "priority",
    ]
