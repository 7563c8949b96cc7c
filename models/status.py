"""The request status machine: the statuses, which are final, and the legal moves.

Moves are made by lifecycle/moves.py, as conditional UPDATEs over these sources."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Status(StrEnum):
    QUEUED = "queued"
    STREAMING = "streaming"
    BATCHED = "batched"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})

# to-status -> the statuses it may be reached from
SOURCES: Mapping[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.STREAMING, Status.BATCHED}),  # retry / requeue
    Status.STREAMING: frozenset({Status.QUEUED, Status.STREAMING}),  # start / heartbeat owner
    Status.BATCHED: frozenset({Status.QUEUED}),
    Status.SUCCEEDED: frozenset({Status.STREAMING, Status.BATCHED}),
    Status.FAILED: frozenset({Status.QUEUED, Status.STREAMING, Status.BATCHED}),
    Status.CANCELLED: frozenset({Status.QUEUED, Status.STREAMING, Status.BATCHED}),
}


class IllegalTransition(ValueError):
    pass


def is_final(status: str) -> bool:
    return status in FINAL
