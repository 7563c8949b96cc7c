"""The `sheepdog` command line (typer). Each command group lives in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sheepdog",
    help="Herd LLM requests to the cheapest path that still meets their deadline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported for their side effect of adding commands to `app`.
    from sheepdog.cli import commands  # noqa: F401


def main() -> None:
    """Entry point of the `sheepdog` script."""
    _register()
    app()
