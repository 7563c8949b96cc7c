"""The loop every per-process batcher of the streaming runtime runs: wait until woken, then hand
whatever is pending over in one batch, again until nothing is left."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def drain_forever(
    wake: asyncio.Event,
    take: Callable[[], list[T]],
    handle: Callable[[list[T]], Awaitable[None]],
) -> None:
    """Run for the life of the process: after each `wake`, `handle(take())` until `take()` is
    empty (items queued during a batch go out with the next one)."""
    while True:
        await wake.wait()
        wake.clear()
        while batch := take():
            await handle(batch)
