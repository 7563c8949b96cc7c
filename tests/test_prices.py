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
