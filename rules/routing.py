"""Which path a request takes: streaming for people waiting, batch for the rest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.settings import Settings
from models.request import ChatRequest, Priority


def choose_route(request: ChatRequest, settings: Settings) -> tuple[str, bool]:
    """(route, escalated). A low-priority request whose deadline falls before the batch window
    can close is escalated to the stream path."""
    if request.priority is not Priority.LOW:
        return "stream", False
    if request.deadline is not None:
        worst = datetime.now(UTC) + timedelta(
            seconds=settings.batch_flush_interval_s + settings.batch_window_s
        )
        if request.deadline < worst:
            return "stream", True
    return "batch", False
