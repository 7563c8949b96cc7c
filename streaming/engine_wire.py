"""What the stream engine and its worker say to each other (streaming/engine.py serves it,
streaming/engine_client.py asks): frames, the address, which errors send a task again. Kept
apart so the worker's side imports none of the engine's runtime.

Frames both ways: a 4-byte big-endian length, then JSON. Asked `{"id", "item", "overlap",
"started"}`; answered `{"ended": str}` or `{"raise": "unavailable" | "error", "message": str}`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import InterfaceError, OperationalError

from streaming import store

READY = b"ready\n"  # written to stdout once the engine serves
HEADER = 4
MAX_FRAME = 64 * 1024 * 1024  # an ask larger than this is not one of the parent's
# What the stream task sends itself again for (its message may be the request's only copy):
# the database or Redis away. The engine answers "unavailable" for these.
RESENT_ON: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    store.Unavailable,
    RedisConnectionError,
    RedisTimeoutError,
)


def frame(obj: Any) -> bytes:
    """`obj` as one frame (the standard library's JSON for what orjson cannot write, such as
    an integer past 64 bits; frames are read with it too, so such a value arrives unchanged)."""
    try:
        data = orjson.dumps(obj)
    except TypeError:
        data = json.dumps(obj).encode()
    return len(data).to_bytes(HEADER, "big") + data


def socket_address(address: str) -> str:
    """A Unix socket address: `@name` is `name` in Linux's abstract namespace."""
    return "\0" + address[1:] if address.startswith("@") else address


def resent_on(err: BaseException) -> bool:
    """True for the errors the task sends itself again for (RESENT_ON, the database away)."""
    return isinstance(err, RESENT_ON) or store.is_transient(err)


def error_answer(err: BaseException) -> dict[str, str]:
    """What the task raises for `err`: Unavailable (sent again later: its message may be the
    request's only copy) or EngineError (the task fails)."""
    if resent_on(err):
        return {"raise": "unavailable", "message": repr(err)}
    return {"raise": "error", "message": f"{type(err).__name__}: {err}"}
