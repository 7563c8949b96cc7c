"""The request bodies the bench scripts send."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MODEL = "sheepdog-mini"


def chat_body(i: int, tag: str) -> dict[str, Any]:
    """A one-message chat request, its prompt unique to (tag, i)."""
    return {"model": MODEL, "messages": [{"role": "user", "content": f"bench {tag} {i}"}]}


def low_requests(
    n: int,
    prompt: str,
    *,
    models: Sequence[str] = (MODEL,),
    max_tokens: int = 40,
    tenant: str | None = None,
) -> list[dict[str, Any]]:
    """n low-priority requests; `prompt` is formatted with each one's index as {i}, and the
    models take turns."""
    return [
        {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": prompt.format(i=i)}],
            "priority": "low",
            "max_tokens": max_tokens,
            **({"metadata": {"tenant": tenant}} if tenant else {}),
        }
        for i in range(n)
    ]
