"""A provider's own token counts, taken only when the tables can hold them."""

from __future__ import annotations

from pydantic import ValidationError

from models.batch_lines import LineUsage


def reported_usage(usage: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a provider's usage object, or None when it holds no such
    counts (missing, negative, past an Integer column, not whole numbers: no "12", 3.0 or
    true): the caller then counts locally and marks the figures estimated, so a relay's bad
    usage cannot block a row's end or credit a budget."""
    try:
        counted = LineUsage.model_validate(usage, strict=True)
    except ValidationError:
        return None
    return counted.prompt_tokens, counted.completion_tokens
