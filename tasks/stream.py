"""Streaming task (queue `stream`): one high/normal-priority request, streamed to its channel."""

from __future__ import annotations

from typing import Any

from streaming.runner import run_stream
from workers.app import app


@app.task(name="sheepdog.stream", acks_late=True, bind=True)
def stream(self: Any, request_id: str, item: dict[str, Any] | None = None) -> str:
    """Stream `request_id` (recording it first when `item`, its intake message, is given).

    Idempotent: the row's queued -> streaming move is the claim, so a redelivered or resent
    message for a request that has ended or is owned by a live worker does nothing."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    return run_stream(request_id, item, overlap=not redelivered)
