"""The pub/sub message of a streaming request (channel sheepdog:stream:{id}, and its replay log).

`{"request_id", "seq", "type": "token"|"done"|"error"|"reset", ...}`: `text` on token, `usage`
and `cost_usd` on done, `error` on error. `seq` counts from 0 without gaps, across retries.
The worker encodes with `encode()` (orjson on a plain dict: this runs once per token); readers
validate with `StreamMessage.parse()`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

MessageType = Literal["token", "done", "error", "reset"]


class StreamUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False


class StreamMessage(BaseModel):
    """One message on a request's channel."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    request_id: str
    seq: int
    type: MessageType
    text: str | None = None
    usage: StreamUsage | None = None
    cost_usd: str | None = None  # decimal string: floats would round money
    finish_reason: str | None = None
    error: str | None = None

    @classmethod
    def parse(cls, raw: bytes | str) -> StreamMessage:
        """Validate one message as read from Redis."""
        return cls.model_validate(orjson.loads(raw))

    @property
    def is_final(self) -> bool:
        return self.type in ("done", "error")


def encode(request_id: str, seq: int, type_: MessageType, **fields: Any) -> bytes:
    """The wire form of a message (same shape as StreamMessage, None fields left out)."""
    msg: dict[str, Any] = {"request_id": request_id, "seq": seq, "type": type_}
    msg.update((k, v) for k, v in fields.items() if v is not None)
    return orjson.dumps(msg)


_SEQ = re.compile(rb'"seq":(\d+)')  # as `encode` writes it (streaming/deliver.lua rewrites it)


def peek_seq(payload: bytes) -> int | None:
    """The seq of a message in its wire form without parsing the rest (None: not one)."""
    found = _SEQ.search(payload)
    return int(found.group(1)) if found else None
