"""The deterministic answer generator: same request body, same answer, on every path.

The seed is a sha256 of model, messages, temperature, max tokens and stop, so a batch line and a
streamed request with the same body get the same text. Each piece is one token as
the simulator's token count (simulator/tokens.py) counts it: a word and the following space.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import orjson

_VOCABULARY = """
the a herd of sheep moves across green hills while dog watches every gate and path river
morning light falls on quiet fields farmer counts flock before noon wind carries sound from
valley some lambs stay close to mother others wander toward old stone wall shepherd whistles
twice barn door opens slowly grass grows tall after rain clouds gather over northern ridge
fence needs repair near gate road bends past small village market sells wool cheese bread
evening brings cool air stars appear above meadow owl calls from oak tree fox waits in
shadow careful plan keeps everyone safe work begins early each day tools rest in shed water
flows through narrow channel bridge crosses stream people share stories by warm fire night
is long season changes slowly leaves turn gold then fall snow covers high pasture animals
find shelter together spring returns with new life hope grows strong simple things matter
most good steady patient clever quick gentle bright calm brave wise kind honest runs walks
leads follows guides gathers returns rests listens learns
"""
WORDS: tuple[str, ...] = tuple(_VOCABULARY.split())

_SENTENCE = (6, 14)


@dataclass(frozen=True, slots=True)
class Answer:
    """A generated answer: its token pieces and why it stopped."""

    pieces: tuple[str, ...]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def seed_of(
    model: str, messages: object, temperature: object, max_tokens: int | None, stop: object
) -> int:
    """The PRNG seed of a request: sha256 of the fields that decide the answer."""
    key = orjson.dumps(
        [model, messages, temperature, max_tokens, stop], option=orjson.OPT_SORT_KEYS
    )
    return int.from_bytes(hashlib.sha256(key).digest()[:16], "big")


def _words(rng: random.Random, count: int) -> list[str]:
    words = rng.choices(WORDS, k=count)
    position = 0
    while position < count:
        words[position] = words[position].capitalize()
        position += rng.randint(*_SENTENCE)
    return words


def _apply_stop(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    text = "".join(pieces)
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut < 0:
        return pieces, False
    kept: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) <= cut:
            kept.append(piece)
            used += len(piece)
            continue
        partial = piece[: cut - used]
        if partial.strip():
            kept.append(partial)
        break
    return kept, True


def generate(
    *,
    model: str,
    messages: object,
    temperature: object = None,
    max_tokens: int | None = None,
    stop: str | list[str] | None = None,
    length_range: tuple[int, int] = (20, 60),
) -> Answer:
    """The answer to a chat request; ``finish_reason`` is ``stop`` or ``length``."""
    rng = random.Random(seed_of(model, messages, temperature, max_tokens, stop))
    natural = rng.randint(*length_range)
    count = natural if max_tokens is None else min(natural, max_tokens)
    pieces = [f"{word} " for word in _words(rng, count)]
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    pieces, stopped = _apply_stop(pieces, stops) if stops else (pieces, False)
    truncated = not stopped and max_tokens is not None and max_tokens < natural
    return Answer(tuple(pieces), "length" if truncated else "stop")
