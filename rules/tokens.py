"""Local token counting: a documented approximation, since tiktoken cannot fetch its encodings here.

A token is a run of word characters or one punctuation mark; each chat message adds a fixed
overhead, as OpenAI's own accounting does. Counts made here are always marked *estimated*.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_TOKEN = re.compile(r"\w+|[^\w\s]")
MESSAGE_OVERHEAD = 4
REPLY_PRIMING = 3


def count_tokens(text: str) -> int:
    """Estimated tokens in a piece of text."""
    return len(_TOKEN.findall(text))


def count_message_tokens(messages: Iterable[Mapping[str, object]]) -> int:
    """Estimated prompt tokens of a chat message list."""
    total = REPLY_PRIMING
    for message in messages:
        total += MESSAGE_OVERHEAD + count_tokens(str(message.get("content") or ""))
    return total
