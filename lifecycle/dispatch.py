"""Sending the stream task: the one place it is sent from.

Three senders use it: the producer (a new request, its intake message in the task), a flush that
escalates a low-priority request whose deadline cannot wait for a batch, and the janitor that
re-sends a dead worker's stream. Flower shows ids, priority and model, never the prompt."""

from __future__ import annotations

from typing import Any

from core.celery_app import STREAM_TASK
from models.intake_message import IntakeItem

# Redis broker priorities: 0 is served first. Flex goes last: its deadline is minutes away at
# least, and a flex task holds a worker thread through its 429 backoffs, so the streams that
# cannot wait are taken before it.
HIGH, NORMAL, FLEX = 0, 5, 9


def send_stream(
    app: Any,
    request_id: str,
    *,
    item: IntakeItem | None = None,
    why: str = "",
    producer: Any = None,
    lane: str | None = None,
    resent: bool = False,
) -> None:
    """Send `request_id`'s stream task; with `item`, the request itself rides along (a row the
    producer could not write is recorded by the worker from it). A flex request (`lane`, or
    the item's) is sent at the lowest priority; one `resent` (its worker died or its message
    was lost: it has waited already), flex or not, at the highest, as high ones are."""
    kwargs: dict[str, Any] = {"request_id": request_id}
    if item is not None:
        kwargs["item"] = item.model_dump(mode="json")
        shown = item.argsrepr()
        priority = HIGH if item.request.get("priority") == "high" else NORMAL
        lane = item.lane
    else:
        shown = f"id={request_id}" + (f" {why}" if why else "")
        priority = HIGH if resent else NORMAL
    if lane == "flex" and not resent:  # a re-sent one has waited already, its deadline nearer
        priority = FLEX
    app.send_task(
        STREAM_TASK,
        kwargs=kwargs,
        argsrepr=shown,
        kwargsrepr="{}",
        priority=priority,
        producer=producer,
    )
