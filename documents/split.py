"""Splitting a document that does not fit the model's context window into parts."""

from __future__ import annotations

import re

from rules.tokens import count_message_tokens, count_tokens

SAFETY = 0.85  # token counts are local estimates: leave room for the provider's own count
_PARAGRAPHS = re.compile(r"\n\s*\n")


def part_budget(context_window: int, answer_tokens: int, prompt_template: str, title: str) -> int:
    """Tokens of document text one request can carry: the window less the answer, the prompt
    around the text and a safety margin."""
    frame = prompt_template.format(title=f"{title} (part 99 of 99)", text="")
    overhead = count_message_tokens([{"role": "user", "content": frame}])
    return int((context_window - answer_tokens - overhead) * SAFETY)


def split_text(text: str, budget: int) -> list[str]:
    """Cut `text` into parts of at most `budget` tokens each, at paragraph breaks where
    possible, then at line breaks, then between words."""
    if budget <= 0:
        raise ValueError(f"no room for document text (budget {budget} tokens)")
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for piece, tokens in _pieces(text, budget):
        if current and used + tokens > budget:
            parts.append("\n\n".join(current))
            current, used = [], 0
        current.append(piece)
        used += tokens
    if current:
        parts.append("\n\n".join(current))
    return [p for p in parts if p.strip()]


def _pieces(text: str, budget: int) -> list[tuple[str, int]]:
    """Paragraphs with their token counts, over-long ones cut down to at most `budget`."""
    out: list[tuple[str, int]] = []
    for paragraph in _PARAGRAPHS.split(text):
        if not paragraph.strip():
            continue
        tokens = count_tokens(paragraph)
        if tokens <= budget:
            out.append((paragraph, tokens))
            continue
        for line in paragraph.splitlines():
            line_tokens = count_tokens(line)
            if line_tokens <= budget:
                if line.strip():
                    out.append((line, line_tokens))
                continue
            out.extend(_cut_words(line, budget))
    return out


def _cut_words(line: str, budget: int) -> list[tuple[str, int]]:
    chunks: list[tuple[str, int]] = []
    words: list[str] = []
    used = 0
    for word in line.split():
        tokens = count_tokens(word)
        if tokens > budget:  # one "word" of punctuation longer than a part: cut by characters
            step = max(1, budget)
            chunks.extend(
                (word[i : i + step], count_tokens(word[i : i + step]))
                for i in range(0, len(word), step)
            )
            continue
        if words and used + tokens > budget:
            chunks.append((" ".join(words), used))
            words, used = [], 0
        words.append(word)
        used += tokens
    if words:
        chunks.append((" ".join(words), used))
    return chunks
