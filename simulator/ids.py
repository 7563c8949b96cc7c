"""Identifiers in OpenAI's formats."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str, nbytes: int = 12) -> str:
    """A random id such as ``chatcmpl-…``, ``file-…``, ``batch_…``."""
    return f"{prefix}{secrets.token_hex(nbytes)}"


def now() -> int:
    """Unix time in whole seconds, as the API reports it."""
    return int(time.time())
