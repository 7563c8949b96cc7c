"""Which path a request takes: streaming for people waiting, batch for the rest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.settings import Settings
from models.intake_message import Route
from models.request import ChatRequest, Priority


def batch_horizon(
    settings: Settings, now: datetime | None = None, *, flushing: bool = False
) -> datetime:
    """The instant before which a deadline cannot wait for the batch path: a batch may take
    the whole batch window, after the next flush (or none: `flushing`, a flush under way)."""
    wait_s = settings.batch_window_s + (0 if flushing else settings.batch_flush_interval_s)
    return (now or datetime.now(UTC)) + timedelta(seconds=wait_s)


def choose_route(request: ChatRequest, settings: Settings) -> tuple[Route, bool]:
    """(route, escalated). A low-priority request whose deadline falls before the batch window
    can close is escalated to the stream path."""
    if request.priority is not Priority.LOW:
        return "stream", False
    if request.deadline is not None and request.deadline < batch_horizon(settings):
        return "stream", True
    return "batch", False
