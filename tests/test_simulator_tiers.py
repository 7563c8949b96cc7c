"""`service_tier` on the simulator's chat completions, through the official SDK over HTTP."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.fixtures.simulator import start_simulator

MODEL = "gpt-4.1-mini"
ASK = [{"role": "user", "content": "Tell me about tiers."}]


def test_served_tier_is_echoed_in_response_and_usage(openai_client: OpenAI) -> None:
    for asked, served in [(None, "default"), ("auto", "default"), ("flex", "flex")]:
        extra = {"service_tier": asked} if asked else {}
        done = openai_client.chat.completions.create(model=MODEL, messages=ASK, **extra)  # type: ignore[call-overload]
        assert done.service_tier == served
        assert done.usage is not None and done.usage.model_extra["service_tier"] == served  # type: ignore[index]


def test_streamed_chunks_name_the_tier(openai_client: OpenAI) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            service_tier="priority",
        )
    )
    assert {c.service_tier for c in chunks} == {"priority"}
    assert chunks[-1].usage is not None


def test_unknown_tier_is_a_400(openai_client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="service_tier"):
        openai_client.chat.completions.create(model=MODEL, messages=ASK, service_tier="cheap")  # type: ignore[arg-type]


def test_a_tier_not_offered_is_served_as_default(simulator) -> None:  # type: ignore[no-untyped-def]
    simulator.configure(service_tiers=[])
    client = OpenAI(base_url=simulator.base_url, api_key=simulator.api_key, max_retries=0)
    done = client.chat.completions.create(model=MODEL, messages=ASK, service_tier="flex")  # type: ignore[arg-type]
    assert done.service_tier == "default"


def test_flex_capacity_answers_429_resource_unavailable() -> None:
    with start_simulator(flex_capacity=0) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model=MODEL, messages=ASK, service_tier="flex")  # type: ignore[arg-type]
        assert err.value.code == "resource_unavailable"
        # The standard tier is not limited by flex capacity.
        assert client.chat.completions.create(model=MODEL, messages=ASK).service_tier == "default"


def test_flex_capacity_counts_calls_in_flight() -> None:
    """Two flex slots, four calls at once: two served, two refused; the slots come back."""
    with start_simulator(flex_capacity=2, ttft_ms=300, flex_slowdown=1, flex_ttft_ms=0) as sim:

        async def one(client: AsyncOpenAI) -> str:
            try:
                done = await client.chat.completions.create(
                    model=MODEL,
                    messages=ASK,  # type: ignore[arg-type]
                    service_tier="flex",
                )
            except openai.RateLimitError:
                return "429"
            return str(done.service_tier)

        async def bursts() -> list[list[str]]:
            client = AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
            return [sorted(await asyncio.gather(*(one(client) for _ in range(4)))) for _ in "ab"]

        assert asyncio.run(bursts()) == [["429", "429", "flex", "flex"]] * 2


def test_flex_waits_its_slowdown() -> None:
    """The simulator's own configured delay (a lower bound, not a speed claim): a 100 ms first
    token is 300 ms on flex."""
    with start_simulator(ttft_ms=100, flex_slowdown=3, flex_ttft_ms=0) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
        start = time.perf_counter()
        client.chat.completions.create(model=MODEL, messages=ASK, service_tier="flex")  # type: ignore[arg-type]
        assert time.perf_counter() - start >= 0.3


@pytest.mark.unit
def test_pace_by_tier() -> None:
    from simulator.config import SimulatorConfig
    from simulator.faults import ChatFaults
    from simulator.tiers import pace

    config = SimulatorConfig(flex_slowdown=3, flex_ttft_ms=50, priority_speedup=2)
    flex, priority = ChatFaults(100, 10), ChatFaults(100, 10)
    pace(flex, "flex", config)
    pace(priority, "priority", config)
    assert (flex.ttft_ms, flex.chunk_delay_ms) == (350, 30)
    assert (priority.ttft_ms, priority.chunk_delay_ms) == (50, 5)
