"""The price table: per-model USD rates per tier (standard, batch, flex, priority) loaded from
TOML, in Decimal. A lane is priced at its tier (`tier_of`); a call is billed at the tier that
served it."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.intake_message import Lane, Route

DEFAULT_PRICE_FILE = Path(__file__).with_name("prices.toml")
MILLION = Decimal(1_000_000)

Tier = Literal["standard", "batch", "flex", "priority"]
TIERS: tuple[Tier, ...] = get_args(Tier)
# What a rate is asked for by: a tier, or a path or lane named after its tier.
Priced = Tier | Route | Lane
_TIER_OF: dict[str, Tier] = {"stream": "standard", **{t: t for t in TIERS}}


def tier_of(what: Priced) -> Tier:
    """The tier a path or lane is priced at (`stream` is the standard tier)."""
    return _TIER_OF[what]


def served_tier(name: object) -> Tier:
    """The tier to bill from a response's `service_tier`: flex or priority when the provider
    says so; standard for `default`, `auto`, nothing (a relay that names no tier) or else."""
    if name == "flex":
        return "flex"
    if name == "priority":
        return "priority"
    return "standard"


class ModelPrice(BaseModel):
    """Rates for one model, USD per 1M tokens at the standard rate."""

    model_config = ConfigDict(frozen=True)

    input_per_million: Decimal = Field(ge=0)
    output_per_million: Decimal = Field(ge=0)
    batch_discount: Decimal = Field(default=Decimal("0.5"), ge=0, le=1)
    # Flex is billed at the batch rate unless the file says otherwise.
    flex_discount: Decimal | None = Field(default=None, ge=0, le=1)
    # Priority: its own rates, else the standard ones times `priority_factor`.
    priority_input_per_million: Decimal | None = Field(default=None, ge=0)
    priority_output_per_million: Decimal | None = Field(default=None, ge=0)
    priority_factor: Decimal = Field(default=Decimal("1.75"), ge=1)
    context_window: int = Field(default=128_000, gt=0)
    max_output_tokens: int = Field(default=16_384, gt=0)

    @field_validator(
        "input_per_million",
        "output_per_million",
        "batch_discount",
        "flex_discount",
        "priority_input_per_million",
        "priority_output_per_million",
        "priority_factor",
        mode="before",
    )
    @classmethod
    def _exact(cls, value: object) -> object:
        # Floats from TOML would carry binary noise into every sum; go through str.
        return str(value) if isinstance(value, float) else value

    def rates(self, what: Priced) -> tuple[Decimal, Decimal]:
        """(input, output) USD per 1M tokens at a tier (or a path or lane's tier)."""
        tier = tier_of(what)
        if tier == "priority":
            return (
                self.priority_input_per_million or self.input_per_million * self.priority_factor,
                self.priority_output_per_million or self.output_per_million * self.priority_factor,
            )
        discount = {
            "standard": Decimal(0),
            "batch": self.batch_discount,
            "flex": self.batch_discount if self.flex_discount is None else self.flex_discount,
        }[tier]
        factor = Decimal(1) - discount
        return self.input_per_million * factor, self.output_per_million * factor

    def cost(self, prompt_tokens: int, completion_tokens: int, what: Priced) -> Decimal:
        """Exact USD cost of a usage at a tier (or a path or lane's tier)."""
        return cost_usd(self, prompt_tokens, completion_tokens, what)

    def at_batch_discount(self, discount: Decimal | None) -> ModelPrice:
        """These prices with a provider's own batch discount (None: unchanged). Flex keeps its
        rate: it is a service tier of the provider, not its Batch API."""
        if discount is None or discount == self.batch_discount:
            return self
        flex = self.batch_discount if self.flex_discount is None else self.flex_discount
        return self.model_copy(update={"batch_discount": discount, "flex_discount": flex})


def cost_usd(
    price: ModelPrice, prompt_tokens: int, completion_tokens: int, what: Priced
) -> Decimal:
    """Exact USD cost of a usage at `price` and a tier (or a path or lane's tier): every
    price is computed here."""
    rate_in, rate_out = price.rates(what)
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

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int, what: Priced) -> Decimal:
        """Exact USD cost of a usage of `model` at a tier (or a path or lane's tier)."""
        return self.get(model).cost(prompt_tokens, completion_tokens, what)

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
        return (
            self.get(model)
            .at_batch_discount(batch_discount)
            .cost(prompt_tokens, completion_tokens, route)
        )

    def at_batch_discounts(self, discounts: Mapping[str, Decimal]) -> PriceTable:
        """The table with each named model's batch lane at its provider's own discount."""
        changed = {
            model: self.models[model].at_batch_discount(discount)
            for model, discount in discounts.items()
            if model in self.models
        }
        return PriceTable(models={**self.models, **changed}) if changed else self


def provider_batch_discount(configured: Decimal | None, mode: str | None) -> Decimal | None:
    """The batch discount a provider's batch lines are billed at: its own when configured; an
    emulated Batch API's lines are plain calls at the standard rate (0); else the price
    table's (None). Submit prices holds and caps with it, ingest bills with it."""
    if configured is not None:
        return configured
    return Decimal(0) if mode == "emulated" else None


def billed_lane(lane: Lane) -> Lane:
    """The lane whose rate caps and holds a request on `lane`: a flex call may fall back to the
    standard lane (or be served at the standard tier), so it is priced there."""
    return "stream" if lane == "flex" else lane


def parse_price_file(path: Path) -> PriceTable:
    """Read a TOML price file (see rules/prices.toml for the shape)."""
    raw = tomllib.loads(path.read_text())
    defaults = {
        "batch_discount": str(raw.get("default_batch_discount", "0.5")),
        "priority_factor": str(raw.get("default_priority_factor", "1.75")),
    }
    models = {
        name: ModelPrice.model_validate({**defaults, **entry})
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
