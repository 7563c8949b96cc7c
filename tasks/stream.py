"""Streaming task (queue `stream`). Placeholder until the streaming path lands: records the row."""

from __future__ import annotations

from typing import Any

from sheepdog.db import session_scope
from sheepdog.intake import parse_items, record_requests
from workers.app import app


@app.task(name="sheepdog.stream", acks_late=True)
def stream(request_id: str, item: dict[str, Any] | None = None) -> None:
    """Record the request; the streaming itself is built by the streaming path."""
    if item is None:
        return
    valid, _ = parse_items([item])
    with session_scope() as session:
        record_requests(session, valid)
