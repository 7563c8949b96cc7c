"""The provider's HTTP/1.1 client on the engine's loop: one POST, its response read by callbacks.

A stream's chunks arrive 10,000 a second under load, each in its own packet. aiohttp hands each
one to the stream's task through its payload reader and four async iterators: a task wakeup and
~22 µs of CPU a chunk on this box, against ~8.5 µs for a protocol that parses the same chunks in
`data_received` (bench/bench_stream.py's engine; both measured at 1,000 concurrent streams). So
the body goes from the socket to a sink called on the loop, and the stream's task wakes once, at
the end. The HTTP parsing is httptools' (llhttp, as uvicorn's); this module keeps connections
(LIFO, one origin a pool), writes the request, and tunnels through an HTTP proxy (CONNECT) when
the environment names one.

Errors are `OSError`s (a cut, a malformed response, a connection the server closed, TLS) or
`Unsendable` (a header that cannot be written); everything else is the caller's.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import urllib.parse
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import httptools

MAX_IDLE_S = 15.0  # an idle connection older than this is closed, not reused (aiohttp's)
DRAIN_S = 2.0  # after the answer's end, how long the rest of its response may take to arrive
_FORBIDDEN = ("host", "content-length", "transfer-encoding", "connection", "accept-encoding")

Sink = Callable[[bytes], None]


class ResponseCut(ConnectionError):
    """The response ended early or was not HTTP."""


class Unsendable(ValueError):
    """The request cannot be written (a header with a line break in it)."""


class _Response:
    """One response: its head, then its body handed to a sink (buffered until there is one).
    `done` resolves when the message is complete, or fails with why it never will be."""

    def __init__(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        self._conn = conn
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self.any_byte = False
        self._buffer: list[bytes] = []
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
        encoding = self.headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):  # asked for identity; a relay may compress anyway
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)
        elif encoding != "identity":
            raise ResponseCut(f"unsupported content-encoding {encoding!r}")
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, data: bytes) -> None:
        if self._inflate is not None:
            data = self._inflate.decompress(data)
        if self._sink is not None:
            self._sink(data)
        else:
            self._buffer.append(data)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            return
        self.keep_alive = self.parser.should_keep_alive()
        if not self.done.done():
            self.done.set_result(None)
        if self._release_when_done:
            self._conn.finished(reuse=True)

    # -- the connection's -----------------------------------------------------------------

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


class _Connection(asyncio.Protocol):
    """One connection of a pool; at most one response at a time."""

    def __init__(self, pool: ProviderHttp) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: _Response | None = None
        self.lost = False
        self.idle_since = 0.0
        self._tunnel: asyncio.Future[bytes] | None = None  # a CONNECT's answer, while it comes
        self._tunnel_head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel_answer(data)
            return
        response = self.response
        if response is None:  # nothing was asked: a server that talks unasked is not reused
            self.close()
            return
        response.any_byte = True
        try:
            response.parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:
            response.fail(err.__context__ or err)
            self.finished(reuse=False)
        except httptools.HttpParserError as err:
            response.fail(ResponseCut(f"malformed HTTP response: {err}"))
            self.finished(reuse=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._tunnel is not None and not self._tunnel.done():
            self._tunnel.set_exception(ResponseCut("the proxy closed the connection"))
        if self.response is not None:
            self.response.fail(exc or ResponseCut("the server closed the connection"))

    # -- use -------------------------------------------------------------------------------

    def send(self, request: bytes) -> _Response:
        assert self.transport is not None
        self.response = _Response(self)
        self.transport.write(request)
        return self.response

    def finished(self, *, reuse: bool) -> None:
        """The response is over: back to the pool (`reuse`, and the server keeps it open) or
        closed."""
        response, self.response = self.response, None
        if reuse and response is not None and response.keep_alive and not self.lost:
            self.pool.put(self)
        else:
            self.close()

    def expire(self, response: _Response) -> None:
        """DRAIN_S after a release: a response still not complete closes its connection."""
        if self.response is response:
            self.response = None
            self.close()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    # -- a proxy's tunnel ------------------------------------------------------------------

    async def tunnel(self, request: bytes) -> None:
        """Send CONNECT and wait for the proxy's 2xx (the head only: no body follows it)."""
        assert self.transport is not None
        self._tunnel = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        head = await self._tunnel
        self._tunnel = None
        status = head.split(b" ", 2)[1:2]
        if not status or not status[0].startswith(b"2"):
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            raise ResponseCut(f"the proxy refused the tunnel: {line}")

    def _tunnel_answer(self, data: bytes) -> None:
        assert self._tunnel is not None
        self._tunnel_head += data
        if b"\r\n\r\n" in self._tunnel_head and not self._tunnel.done():
            self._tunnel.set_result(self._tunnel_head)


class ProviderHttp:
    """The connections to one provider URL (through `proxy`, when given) and the POSTs to it."""

    def __init__(
        self, url: str, proxy: str | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Unsendable(f"not an http(s) URL: {url!r}")
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        default_port = self.port == (443 if self.https else 80)
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = name if default_port else f"{name}:{self.port}"
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.ssl = (ssl_context or ssl.create_default_context()) if self.https else None
        self.proxy = urllib.parse.urlsplit(proxy) if proxy else None
        if self.proxy is not None and (self.proxy.scheme != "http" or not self.proxy.hostname):
            raise Unsendable(f"proxy {self.proxy.scheme}://… is not an http:// proxy")
        self.proxy_auth = _basic_auth(self.proxy) if self.proxy else None
        if self.proxy is not None and not self.https:
            self.target = url  # a plain-HTTP request through a proxy names the whole URL
        self._idle: list[_Connection] = []

    async def post(self, body: bytes, headers: Mapping[str, str]) -> _Response:
        """POST `body` and return the response once its head has arrived. A connection the
        server had closed while idle (nothing of the answer came) is replaced once."""
        request = self._request(body, headers)
        for attempt in (1, 2):
            conn, reused = await self._take()
            response = conn.send(request)
            try:
                await response.head
            except ConnectionError:
                conn.finished(reuse=False)
                if reused and not response.any_byte and attempt == 1:
                    continue
                raise
            except BaseException:
                conn.finished(reuse=False)
                raise
            return response
        raise AssertionError("unreachable")

    def put(self, conn: _Connection) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    def _request(self, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = [f"POST {self.target} HTTP/1.1", f"Host: {self.authority}"]
        for name, value in headers.items():
            if name.lower() in _FORBIDDEN:
                continue
            if not name or any(c in name for c in ":\r\n\0 ") or any(c in value for c in "\r\n\0"):
                raise Unsendable(f"header {name!r} cannot be sent")
            lines.append(f"{name}: {value}")
        if self.proxy_auth is not None and not self.https:
            lines.append(f"Proxy-Authorization: {self.proxy_auth}")
        lines += [f"Content-Length: {len(body)}", "Accept-Encoding: identity", "", ""]
        return "\r\n".join(lines).encode("latin-1") + body

    async def _take(self) -> tuple[_Connection, bool]:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost and now - conn.idle_since < MAX_IDLE_S:
                return conn, True
            conn.close()
        return await self._connect(), False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self.proxy is None:
            _, conn = await loop.create_connection(
                lambda: _Connection(self),
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.host if self.https else None,
            )
            return conn
        proxy_host = self.proxy.hostname or ""
        proxy_port = self.proxy.port or (443 if self.proxy.scheme == "https" else 80)
        transport, conn = await loop.create_connection(
            lambda: _Connection(self), proxy_host, proxy_port
        )
        if not self.https:
            return conn
        try:
            lines = [f"CONNECT {self.host}:{self.port} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            if self.proxy_auth is not None:
                lines.append(f"Proxy-Authorization: {self.proxy_auth}")
            await conn.tunnel(("\r\n".join([*lines, "", ""])).encode("latin-1"))
            assert self.ssl is not None
            tls = await loop.start_tls(transport, conn, self.ssl, server_hostname=self.host)
        except BaseException:
            transport.close()
            raise
        if tls is None:
            raise ResponseCut("TLS through the proxy failed")
        conn.transport = tls  # type: ignore[assignment]
        return conn


def _basic_auth(proxy: urllib.parse.SplitResult) -> str | None:
    if proxy.username is None:
        return None
    user = urllib.parse.unquote(proxy.username)
    password = urllib.parse.unquote(proxy.password or "")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
