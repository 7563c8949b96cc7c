"""``service_tier`` on chat completions: which tier serves a call, how fast, and flex capacity.

As OpenAI's API does: ``flex`` is slower and answers 429 ("resource unavailable") when its
capacity is used up, ``priority`` is faster, and a tier the provider does not offer (or
``auto``) is served as ``default``. The tier that served the call is named in the response."""

from __future__ import annotations

from dataclasses import dataclass

from simulator.config import SimulatorConfig
from simulator.errors import ApiError, bad_request
from simulator.faults import ChatFaults

ASKABLE = frozenset({"auto", "default", "flex", "priority", "scale"})
FLEX_BUSY = "Resource unavailable: flex processing capacity is exhausted (simulated)."


def parse_tier(body: dict[str, object]) -> str | None:
    """The tier asked for (None: not named); 400 for a value the API does not know."""
    tier = body.get("service_tier")
    if tier is None:
        return None
    if not isinstance(tier, str) or tier not in ASKABLE:
        raise bad_request(
            f"Invalid value for 'service_tier': {tier!r}. Supported values are: "
            + ", ".join(f"'{t}'" for t in sorted(ASKABLE)),
            param="service_tier",
            code="invalid_value",
        )
    return tier


def served_tier(asked: str | None, config: SimulatorConfig) -> str:
    """The tier that serves a call: the one asked for when offered, else ``default``."""
    if asked in ("flex", "priority") and asked in config.service_tiers:
        return asked
    return "default"


def pace(faults: ChatFaults, tier: str, config: SimulatorConfig) -> None:
    """Slow a flex call down and speed a priority one up (in place)."""
    if tier == "flex":
        faults.ttft_ms = faults.ttft_ms * config.flex_slowdown + config.flex_ttft_ms
        faults.chunk_delay_ms *= config.flex_slowdown
    elif tier == "priority":
        faults.ttft_ms /= config.priority_speedup
        faults.chunk_delay_ms /= config.priority_speedup


@dataclass
class FlexSlots:
    """Flex calls in flight, against ``flex_capacity`` (None: unlimited)."""

    in_flight: int = 0

    def take(self, capacity: int | None) -> None:
        """Take a slot, or raise the 429 a flex call gets when capacity has run out."""
        if capacity is not None and self.in_flight >= capacity:
            raise ApiError(
                429,
                FLEX_BUSY,
                code="resource_unavailable",
                type_="resource_unavailable",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1

    def give_back(self) -> None:
        self.in_flight = max(self.in_flight - 1, 0)
