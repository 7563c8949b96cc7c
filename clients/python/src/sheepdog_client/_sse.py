"""A server-sent events decoder (the WHATWG event-stream format): a body's bytes into lines,
lines into events."""

from __future__ import annotations

import re
from dataclasses import dataclass

LINE_END = re.compile(rb"\r\n|\r|\n")
DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII only (str.isdigit takes "²")
BOM = b"\xef\xbb\xbf"


class LineSplitter:
    """One connection's body, chunk by chunk, into lines without their line break. Lines break
    at CR, LF or CRLF only, as the format says (httpx's `iter_lines`, like `str.splitlines`,
    also breaks at U+2028, U+2029 and U+0085, which JSON carries unescaped), and a leading BOM
    is dropped. A last line with no break is never handed on (its event is incomplete)."""

    def __init__(self) -> None:
        self._rest = b""
        self._after_cr = False  # the last chunk ended in CR: an LF first in the next is its pair
        self._start = True

    def feed(self, chunk: bytes) -> list[str]:
        data = self._rest + chunk
        if self._after_cr and data:
            self._after_cr = False
            data = data.removeprefix(b"\n")
        if self._start:
            if BOM.startswith(data):  # (a BOM split across chunks, or nothing yet)
                self._rest = data
                return []
            self._start = False
            data = data.removeprefix(BOM)
        lines = LINE_END.split(data)
        self._rest = lines.pop()
        self._after_cr = data.endswith(b"\r")
        return [line.decode("utf-8", "replace") for line in lines]


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None


class SSEDecoder:
    """Feed lines without their line break; `feed` returns an event when a blank line ends one.
    Comments (`:` lines, the server's keep-alives) are skipped. `last_event_id` and `retry_ms`
    (the server's `retry:`, the reconnection delay) persist across events and connections, as the
    format says; `new_connection()` drops a half-read event."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None

    def new_connection(self) -> None:
        self._event, self._data = "", []

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and DIGITS.fullmatch(value):
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent(event or "message", "\n".join(data), self.last_event_id)
