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


class BatchStatus(StrEnum):
    """A batch job's status: the provider's own, plus `preparing` (claimed, not yet created at
    the provider). An emulated job runs through the same statuses."""

    PREPARING = "preparing"
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


BATCH_OPEN = frozenset(
    {
        BatchStatus.VALIDATING,
        BatchStatus.IN_PROGRESS,
        BatchStatus.FINALIZING,
        BatchStatus.CANCELLING,
    }
)
BATCH_FINAL = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)

# A poll samples the provider's lifecycle, so it may see any later status than the last one
# (validating -> completed); an open status may be written again (fresh counts). Nothing
# leaves a final status, nothing goes back, and `preparing` is only ever inserted.
_BEFORE_CANCELLING = frozenset(
    {
        BatchStatus.PREPARING,
        BatchStatus.VALIDATING,
        BatchStatus.IN_PROGRESS,
        BatchStatus.FINALIZING,
    }
)
# to-status -> the statuses it may be reached from
BATCH_SOURCES: Mapping[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.PREPARING: frozenset(),
    BatchStatus.VALIDATING: frozenset({BatchStatus.PREPARING, BatchStatus.VALIDATING}),
    BatchStatus.IN_PROGRESS: frozenset(
        {BatchStatus.PREPARING, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS}
    ),
    BatchStatus.FINALIZING: _BEFORE_CANCELLING,
    BatchStatus.CANCELLING: _BEFORE_CANCELLING | {BatchStatus.CANCELLING},
    **{final: _BEFORE_CANCELLING | {BatchStatus.CANCELLING} for final in BATCH_FINAL},
}


def is_batch_final(status: str) -> bool:
    return status in BATCH_FINAL
