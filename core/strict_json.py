"""JSON from callers, parsed strictly: every oddity is an InvalidRequest with one line, never a
RecursionError, ValueError or a silently chosen value.

Refused: nesting deeper than MAX_DEPTH (and anything Python's parser cannot recurse into),
integers longer than MAX_INT_DIGITS, numbers that overflow to infinity (`1e999999`), NaN and
Infinity, and an object with the same key twice (RFC 8259 leaves it to the parser; taking the
last one silently would send something the caller did not mean).
"""

from __future__ import annotations

import json
import math
from typing import Any

from core.errors import InvalidRequest

MAX_DEPTH = 64
MAX_INT_DIGITS = 30


class _Refused(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Refused(f"duplicate key {key[:40]!r}")
        obj[key] = value
    return obj


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text):,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _constant(text: str) -> Any:
    raise _Refused(f"{text} is not a JSON number")


def _depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (a cheap scan before parsing)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads(text: str, where: str = "") -> Any:
    """Parse `text`; InvalidRequest naming `where` (e.g. `requests.jsonl:3`) when refused."""
    prefix = f"{where}: " if where else ""
    if ("[" in text or "{" in text) and _depth(text) > MAX_DEPTH:
        raise InvalidRequest(f"{prefix}JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_int=_int,
            parse_float=_float,
            parse_constant=_constant,
        )
    except json.JSONDecodeError as err:
        raise InvalidRequest(f"{prefix}not valid JSON ({err.msg})") from None
    except _Refused as err:
        raise InvalidRequest(f"{prefix}refused JSON: {err}") from None
    except RecursionError:
        raise InvalidRequest(f"{prefix}JSON nested too deeply") from None
