"""The models the simulator serves by default: those of Sheepdog's shipped price table.

The simulator bills nothing, so it needs only the names. They match the models in
``rules/prices.toml`` (a test checks it), so every model Sheepdog prices is one the simulator
knows; ``create_app(models=...)`` serves another list.
"""

from __future__ import annotations

MODELS: tuple[str, ...] = (
    "claude-sonnet-4.5",
    "deepseek-v3.2",
    "gemini-2.5-flash",
    "gpt-4.1",
    "gpt-4.1-mini",
    "sheepdog-mini",
)
