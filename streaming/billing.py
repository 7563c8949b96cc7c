"""What the provider billed a stream for text it will not be paid for by an answer's usage:
the answers a retry took back, the text of an answer cut (cancel, failure), and what earlier
attempts sent before their worker was killed or fenced. Estimated, as a cut answer has no
usage: each call that streamed text is billed its prompt, every piece as a token."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rules.tokens import count_tokens
from streaming.end import TakenBack


@dataclass(slots=True)
class Billed:
    """Calls that streamed text, and the pieces of the answers let go of (this attempt's own
    pieces are counted at its end)."""

    calls: int = 0
    pieces: int = 0

    def cut(self, prompt: int, tokens: int, text: str) -> dict[str, Any]:
        """The usage of a cut stream (its current answer `tokens` pieces of `text`), or none
        when no call streamed text."""
        if not self.calls:
            return {}
        return {
            "prompt_tokens": prompt * self.calls,
            "completion_tokens": self.pieces + max(tokens, count_tokens(text)),
            "usage_estimated": True,
        }

    def before(self, prompt: Callable[[], int], answered: bool) -> TakenBack | None:
        """What a succeeded stream is charged beside its answer's usage: the calls before the
        answer's that streamed text (the answer's, when it `answered` with text, is in its
        usage) and the pieces let go of. `prompt` counts the prompt, only when some is."""
        earlier = max(0, self.calls - (1 if answered else 0))
        if not (earlier or self.pieces):
            return None
        return TakenBack(prompt() * earlier if earlier else 0, self.pieces)
