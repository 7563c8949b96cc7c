"""Shared CLI output: one-line errors and the service-unavailable guard."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import typer

from core.errors import SheepdogError

T = TypeVar("T")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    typer.echo(f"sheepdog: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def edge() -> Iterator[None]:
    """Turn Sheepdog's own errors into one line on stderr and exit code 2 (never a traceback)."""
    try:
        yield
    except SheepdogError as err:
        fail(str(err))


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str, sort_keys=False) + "\n")
