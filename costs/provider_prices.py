"""The price table as this deployment's providers bill it: what submit chooses a low request's
lane by, and prices a budget's hold and a cost cap's `max_tokens` at. A batch line is billed at
its provider's own batch rate (rules.prices.provider_batch_discount: a configured
`batch_discount`, or the standard rate on a provider with no Batch API), so the batch lane is
priced at that rate, not the table's."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal

from core.providers import ProviderConfig, known_batch_mode, load_providers
from core.settings import Settings
from rules.prices import PriceTable, provider_batch_discount

REFRESH_S = 60.0  # how long a process keeps its table: an `auto` provider's probe may answer


def provider_prices(table: PriceTable, settings: Settings) -> PriceTable:
    """`table` with each model's batch lane at its provider's rate where that is known now
    (an `auto` provider not probed yet keeps the table's rate until the first flush asks)."""
    providers = load_providers(settings)
    modes: dict[str, str | None] = {}  # (one look a provider, however many models it serves)
    discounts: dict[str, Decimal] = {}
    for model in table.names():
        try:
            provider: ProviderConfig = providers.for_model(model)
        except KeyError:
            continue
        if provider.name not in modes:
            modes[provider.name] = known_batch_mode(provider, settings)
        discount = provider_batch_discount(provider.batch_discount, modes[provider.name])
        if discount is not None:
            discounts[model] = discount
    return table.at_batch_discounts(discounts)


class ProviderPrices:
    """`provider_prices` of the settings' table, kept for REFRESH_S."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._kept: tuple[float, PriceTable, PriceTable] | None = None  # (until, table, priced)

    def get(self, table: PriceTable) -> PriceTable:
        now = self._clock()
        kept = self._kept
        if kept is None or kept[0] <= now or kept[1] is not table:
            kept = self._kept = (now + REFRESH_S, table, provider_prices(table, self.settings))
        return kept[2]
