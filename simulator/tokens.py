"""The simulator's token count for ``usage``: the same approximation Sheepdog estimates with.

A token is a run of up to ten word characters, one character of a script written without
spaces (Han, kana, Hangul), or one punctuation mark; each chat message adds a fixed overhead.
Sheepdog's own estimate (``rules/tokens.py``) counts the same way, so a provider's usage and
Sheepdog's estimate agree on the simulator; the tests compare the two. Kept here rather than
imported so the simulator stands alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_UNSPACED}]|[^\W{_UNSPACED}]{{1,10}}|[^\w\s]")
MESSAGE_OVERHEAD = 4
REPLY_PRIMING = 3


def count_tokens(text: str) -> int:
    """Tokens in a piece of text."""
    return len(_TOKEN.findall(text))


def count_message_tokens(messages: Iterable[Mapping[str, object]]) -> int:
    """Prompt tokens of a chat message list."""
    total = REPLY_PRIMING
    for message in messages:
        total += MESSAGE_OVERHEAD + count_tokens(str(message.get("content") or ""))
    return total
