"""The price table: per-model USD rates (standard and batch) loaded from TOML, in Decimal."""

from __future__ import annotations

import tomllib
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.intake_message import Route

DEFAULT_PRICE_FILE = Path(__file__).with_name("prices.toml")
MILLION = Decimal(1_000_000)


class ModelPrice(BaseModel):
    """Rates for one model, USD per 1M tokens at the standard rate."""

    model_config = ConfigDict(frozen=True)

    input_per_million: Decimal = Field(ge=0)
    output_per_million: Decimal = Field(ge=0)
    batch_discount: Decimal = Field(default=Decimal("0.5"), ge=0, le=1)
    context_window: int = Field(default=128_000, gt=0)
    max_output_tokens: int = Field(default=16_384, gt=0)

    @field_validator("input_per_million", "output_per_million", "batch_discount", mode="before")
    @classmethod
    def _exact(cls, value: object) -> object:
        # Floats from TOML would carry binary noise into every sum; go through str.
        return str(value) if isinstance(value, float) else value

    def rates(self, route: Route) -> tuple[Decimal, Decimal]:
        """(input, output) USD per 1M tokens on the given route."""
        factor = Decimal(1) - self.batch_discount if route == "batch" else Decimal(1)
        return self.input_per_million * factor, self.output_per_million * factor

    def cost(self, prompt_tokens: int, completion_tokens: int, route: Route) -> Decimal:
        """Exact USD cost of a usage on a route."""
        return cost_usd(self, prompt_tokens, completion_tokens, route)


def cost_usd(
    price: ModelPrice, prompt_tokens: int, completion_tokens: int, route: Route
) -> Decimal:
    """Exact USD cost of a usage at `price` on `route`: every price is computed here."""
    rate_in, rate_out = price.rates(route)
    return (rate_in * prompt_tokens + rate_out * completion_tokens) / MILLION


class PriceTable(BaseModel):
    """All known models. A model not in the table is refused at the edge."""

    model_config = ConfigDict(frozen=True)

    models: dict[str, ModelPrice]

    def get(self, model: str) -> ModelPrice:
        """The model's prices; KeyError naming the known models when it is unknown."""
        try:
            return self.models[model]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise KeyError(f"unknown model {model!r}; known models: {known}") from None

    def __contains__(self, model: object) -> bool:
        return model in self.models

    def names(self) -> list[str]:
        return sorted(self.models)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int, route: Route) -> Decimal:
        """Exact USD cost of a usage of `model` on `route`."""
        return self.get(model).cost(prompt_tokens, completion_tokens, route)

    def cost_of(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        route: Route,
        batch_discount: Decimal | None = None,
    ) -> Decimal:
        """`cost`, at `batch_discount` when given: a provider's own batch discount, not the
        table's (an emulated batch runs at the standard rate: 0)."""
        price = self.get(model)
        if batch_discount is not None and batch_discount != price.batch_discount:
            price = price.model_copy(update={"batch_discount": batch_discount})
        return price.cost(prompt_tokens, completion_tokens, route)


def parse_price_file(path: Path) -> PriceTable:
    """Read a TOML price file (see rules/prices.toml for the shape)."""
    raw = tomllib.loads(path.read_text())
    discount = raw.get("default_batch_discount", "0.5")
    models = {
        name: ModelPrice.model_validate({"batch_discount": str(discount), **entry})
        for name, entry in raw.get("models", {}).items()
    }
    if not models:
        raise ValueError(f"price file {path} lists no models")
    return PriceTable(models=models)


@lru_cache(maxsize=8)
def load_price_table(path: str | None = None) -> PriceTable:
    """The price table from `path`, or the shipped default."""
    return parse_price_file(Path(path) if path else DEFAULT_PRICE_FILE)


def price_table() -> PriceTable:
    """The price table named by settings (SHEEPDOG_PRICE_TABLE_FILE) or the default."""
    from core.settings import get_settings

    return load_price_table(get_settings().price_table_file)
