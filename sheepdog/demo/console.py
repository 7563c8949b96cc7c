"""The demo's one console: every module prints through it, so output interleaves in order."""

from __future__ import annotations

import sys

from rich.console import Console

# A fixed width when captured (the tests, a log file): rich's table layout stays readable.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)
