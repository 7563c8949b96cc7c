"""Registers every command module on the `sheepdog` app."""

from __future__ import annotations

import importlib

from sheepdog.cli import app

# Each module defines register(app). Later features add their module here.
MODULES = [
    "sheepdog.cli.services",
    "sheepdog.cli.requests",
    "sheepdog.cli.simulator",
    "sheepdog.cli.batches",
    "sheepdog.cli.costs",
    "sheepdog.cli.ops",
    "sheepdog.cli.api",
    "sheepdog.cli.webhooks",
]

for name in MODULES:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:  # a feature not installed in this tree
        if err.name != name:
            raise
        continue
    module.register(app)
