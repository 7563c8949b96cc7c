"""The `sheepdog` command line (typer). Each command group lives in its own module, which adds
its commands to the app it is given; `build_app()` makes the whole CLI, nothing at import."""

from __future__ import annotations

import typer


def build_app() -> typer.Typer:
    """The `sheepdog` app with every command group on it."""
    from sheepdog.cli import api, batches, costs, ops, requests, services, simulator, webhooks

    app = typer.Typer(
        name="sheepdog",
        help="Herd LLM requests to the cheapest path that still meets their deadline.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for group in (services, requests, simulator, batches, costs, ops, api, webhooks):
        group.register(app)
    return app


def main() -> None:
    """Entry point of the `sheepdog` script."""
    build_app()()
