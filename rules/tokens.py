"""Local token counting: a documented approximation, since tiktoken cannot fetch its encodings here.

A token is a run of up to ten word characters, one character of a script written without
spaces (Han, kana, Hangul: one token or more each in OpenAI's encodings), or one punctuation
mark; each chat message adds a fixed overhead, as OpenAI's own accounting does. Counts made
here are always marked *estimated*. The ten-character bound is why a long Chinese paragraph or
a base64 blob is not priced (budget hold, cost cap's ``max_tokens``) as a single token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_UNSPACED}]|[^\W{_UNSPACED}]{{1,10}}|[^\w\s]")
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
