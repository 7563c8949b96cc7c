"""One response of the provider's HTTP client (streaming/provider_http.py): the parser's
callbacks (httptools), the body buffered until a sink takes it, compression undone, and what
becomes of the connection once the caller is done with it."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import httptools

DRAIN_S = 2.0  # after the answer's end, how long the rest of its response may take to arrive
BUFFER_LIMIT = 1 << 20  # body bytes held before anyone reads them; reading pauses past it

Sink = Callable[[bytes], None]


class Holder(Protocol):
    """The connection a response arrives on (provider_http._Connection)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def finished(self, *, reuse: bool) -> None: ...

    def expire(self, response: Response) -> None: ...


class ResponseCut(ConnectionError):
    """The response ended early or was not HTTP."""


class Response:
    """One response: its head, then its body handed to a sink (buffered until there is one).
    `done` resolves when the message is complete, or fails with why it never will be."""

    def __init__(self, conn: Holder) -> None:
        loop = asyncio.get_running_loop()
        self._conn = conn
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self.until_close = False  # no length and not chunked: the body ends with the connection
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._sink: Sink | None = None
        self._inflate: Any = None
        self._release_when_done = False

    # -- the parser's callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:  # an interim answer (103 Early Hints): the real one follows
            self.headers = {}
            return
        self.until_close = (
            "content-length" not in self.headers
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
            and self.status not in (204, 304)
        )
        encoding = self.headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):  # asked for identity; a relay may compress anyway
            self._inflate = _Inflate(encoding)
        elif encoding != "identity":
            raise ResponseCut(f"unsupported content-encoding {encoding!r}")
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, data: bytes) -> None:
        if self._inflate is not None:
            try:
                data = self._inflate.decompress(data)
            except zlib.error as err:
                raise ResponseCut(f"the compressed answer is corrupt: {err}") from None
        if self._sink is not None:
            self._sink(data)
        else:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered > BUFFER_LIMIT:
                self._conn.pause()  # nobody reads yet (the job waits for its grant)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            return
        self.keep_alive = self.parser.should_keep_alive()
        if not self.done.done():
            self.done.set_result(None)
        if self._release_when_done:
            self._conn.finished(reuse=True)

    # -- the connection's -----------------------------------------------------------------

    def ended_with_connection(self) -> None:
        """A body without a length ends when the server closes the connection: complete."""
        self.keep_alive = False
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, err: BaseException) -> None:
        for future in (self.head, self.done):
            if not future.done():
                future.set_exception(err)
                future.exception()  # retrieved: whoever awaits it sees it; nobody else need

    # -- the caller's ---------------------------------------------------------------------

    def read_into(self, sink: Sink) -> None:
        """From now on hand the body to `sink` (what arrived before it first, at once). An
        exception the sink raises fails `done` with it and closes the connection."""
        self._sink = sink
        buffered, self._buffer = self._buffer, []
        if self._buffered > BUFFER_LIMIT:
            self._conn.resume()
        self._buffered = 0
        try:
            for data in buffered:
                sink(data)
        except Exception as err:
            self.fail(err)
            self._conn.finished(reuse=False)

    async def read(self, limit: int) -> bytes:
        """The body up to `limit` bytes (an error answer's), once the message is complete or
        the limit reached."""
        parts: list[bytes] = []
        size = 0
        enough: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def collect(data: bytes) -> None:
            nonlocal size
            parts.append(data[: max(limit - size, 0)])
            size += len(data)
            if size >= limit and not enough.done():
                enough.set_result(None)

        self.read_into(collect)
        await asyncio.wait([self.done, enough], return_when=asyncio.FIRST_COMPLETED)
        if not enough.done() and self.done.exception() is not None:
            raise self.done.exception()  # type: ignore[misc]
        return b"".join(parts)

    def release(self, *, reuse: bool) -> None:
        """Done with the response: with `reuse`, the connection goes back to its pool once the
        message is complete (now, or within DRAIN_S); otherwise it is closed."""
        if not reuse or (self.done.done() and self.done.exception() is not None):
            self._conn.finished(reuse=False)
        elif self.done.done():
            self._conn.finished(reuse=True)
        else:
            self._sink = _discard
            self._release_when_done = True
            asyncio.get_running_loop().call_later(DRAIN_S, self._conn.expire, self)


def _discard(_: bytes) -> None:
    pass


class _Inflate:
    """A gzip or deflate answer decompressed. Deflate is read zlib-wrapped, as the standard
    says, and as raw deflate (as many servers send it) when the wrapped reading fails at once."""

    def __init__(self, encoding: str) -> None:
        self._obj: Any = zlib.decompressobj(zlib.MAX_WBITS | (32 if encoding == "gzip" else 0))
        self._unsure = encoding == "deflate"  # until the wrapped reading has given something
        self._seen = b""

    def decompress(self, data: bytes) -> bytes:
        if not self._unsure:
            return bytes(self._obj.decompress(data))
        self._seen += data
        try:
            out = bytes(self._obj.decompress(data))
        except zlib.error:
            self._unsure = False
            self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
            return bytes(self._obj.decompress(self._seen))
        if out:
            self._unsure, self._seen = False, b""
        return out
