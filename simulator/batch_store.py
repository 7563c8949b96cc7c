"""The simulator's batches in memory: one ``BatchJob`` each, kept by a ``BatchStore``.

Its own module so that the HTTP handlers (``batches``) and the lifecycle (``batch_runner``) both
import it without importing each other.
"""

from __future__ import annotations

import asyncio
from typing import Any

from simulator.config import FaultRule
from simulator.errors import not_found
from simulator.ids import now

FINAL = {"completed", "failed", "expired", "cancelled"}


class BatchJob:
    """One batch: its API object plus what the runner needs."""

    def __init__(self, obj: dict[str, Any], faults: list[FaultRule], deadline: float) -> None:
        self.obj = obj
        self.faults = faults
        self.deadline = deadline  # time.monotonic() at which the window ends
        self.task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return str(self.obj["id"])

    @property
    def status(self) -> str:
        return str(self.obj["status"])

    def set_status(self, status: str, stamp: str | None = None) -> None:
        """Move to ``status`` and set its timestamp field (``<stamp>_at``)."""
        self.obj["status"] = status
        self.obj[f"{stamp or status}_at"] = now()


class BatchStore:
    """Batches by id, in creation order; each has a runner task while it is not final."""

    def __init__(self) -> None:
        self.jobs: dict[str, BatchJob] = {}

    def get(self, batch_id: str) -> BatchJob:
        try:
            return self.jobs[batch_id]
        except KeyError:
            raise not_found(f"No batch found with id '{batch_id}'.", param="batch_id") from None

    async def close(self) -> None:
        """Stop every runner (at application shutdown)."""
        tasks = [job.task for job in self.jobs.values() if job.task and not job.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
