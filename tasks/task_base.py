"""The base class of every Sheepdog task: a retry keeps what Flower shows.

Celery builds a retry's message from the request (`Task.retry` → `signature_from_request`),
which carries the arguments but not `argsrepr`/`kwargsrepr`: the re-sent message then shows its
full arguments (for the intake task: requests, bodies, metadata) to Flower and in the worker's
events. Passing the first message's reprs on keeps every attempt to ids, priority and model.
"""

from __future__ import annotations

from typing import Any

from celery import Task


class SheepdogTask(Task):  # type: ignore[misc]
    """A Celery task whose retries keep the reprs the producer set."""

    def retry(self, *args: Any, **options: Any) -> Any:
        for name in ("argsrepr", "kwargsrepr"):
            shown = getattr(self.request, name, None)
            if shown is not None and name not in options:
                options[name] = shown
        return super().retry(*args, **options)
