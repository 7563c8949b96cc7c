"""The provider's HTTP/1.1 client on the engine's loop: one POST, its response read by callbacks.

A stream's chunks arrive 10,000 a second under load, each in its own packet. aiohttp handed each
one to the stream's task through its payload reader and async iterators, a task wakeup a chunk:
~23 µs of CPU a chunk on this box, against ~11 µs here (bench/bench_provider_read.py, 1,000
concurrent streams, the request and its SSE parsing included). So the body goes from the socket
to a sink called on the loop, and the stream's task wakes once, at the end. The HTTP parsing is
httptools' (llhttp, as uvicorn's); this module keeps connections (LIFO, one origin a pool),
writes the request, and tunnels through an HTTP proxy (CONNECT) when the environment names one.

Errors are `OSError`s (a cut, a malformed response, a connection the server closed, TLS) or
`Unsendable` (a header that cannot be written); everything else is the caller's.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import select
import ssl
import urllib.parse
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import httptools

MAX_IDLE_S = 15.0  # an idle connection older than this is closed, not reused (aiohttp's)
DRAIN_S = 2.0  # after the answer's end, how long the rest of its response may take to arrive
BUFFER_LIMIT = 1 << 20  # body bytes held before anyone reads them; reading pauses past it
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
        try:
            response.parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:
            response.fail(err.__context__ or err)
            self.finished(reuse=False)
        except httptools.HttpParserUpgrade:
            response.fail(ResponseCut("the server switched protocols"))
            self.finished(reuse=False)
        except httptools.HttpParserError as err:
            response.fail(ResponseCut(f"malformed HTTP response: {err}"))
            self.finished(reuse=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._tunnel is not None and not self._tunnel.done():
            self._tunnel.set_exception(ResponseCut("the proxy closed the connection"))
        response = self.response
        if response is None:
            return
        if exc is None and response.head.done() and response.until_close:
            response.ended_with_connection()
        response.fail(exc or ResponseCut("the server closed the connection"))

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def readable(self) -> bool:
        """True when the idle socket has something to read: the server's close (or data it
        was not asked for), which the loop has not handled yet. Such a connection is not
        reused: the request would go to a server that has already hung up."""
        if self.transport is None or self.transport.is_closing():
            return True  # closing (a TLS close_notify read, say) but not yet told lost
        sock = self.transport.get_extra_info("socket")
        poll = getattr(select, "poll", None)
        if sock is None or poll is None:
            return sock is None
        try:
            poller = poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (ValueError, OSError):  # a socket closed meanwhile (fileno -1)
            return True

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
        if any(c in self.target for c in " \r\n\0"):
            raise Unsendable(f"the URL's path cannot be sent: {self.target!r}")
        self.ssl = (ssl_context or ssl.create_default_context()) if self.https else None
        self.proxy = urllib.parse.urlsplit(proxy) if proxy else None
        if self.proxy is not None and (self.proxy.scheme != "http" or not self.proxy.hostname):
            raise Unsendable(f"proxy {self.proxy.scheme}://… is not an http:// proxy")
        self.proxy_auth = _basic_auth(self.proxy) if self.proxy else None
        if self.proxy is not None and not self.https:
            # A plain-HTTP request through a proxy names the whole URL (no user:password in it).
            self.target = f"http://{self.authority}{self.target}"
        self._idle: collections.deque[_Connection] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None

    async def post(self, body: bytes, headers: Mapping[str, str]) -> _Response:
        """POST `body` and return the response once its head has arrived.

        A kept connection is used only while the server has not closed it (checked on the
        socket just before); a request is never sent twice here, whatever happens to it: a
        provider may have done, and billed, the work. The caller's retry decides."""
        request = self._request(body, headers)
        conn = await self._take()
        response = conn.send(request)
        try:
            await response.head
        except BaseException:
            conn.finished(reuse=False)
            raise
        return response

    def put(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(MAX_IDLE_S, self._close_expired)

    def close(self) -> None:
        """Close the idle connections (the pool takes new ones as it is used again)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    def _close_expired(self) -> None:
        """Close the connections idle for MAX_IDLE_S (the oldest are at the left); come back
        when the next one expires."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and (self._idle[0].lost or now - self._idle[0].idle_since >= MAX_IDLE_S):
            self._idle.popleft().close()
        self._sweep = None
        if self._idle:
            due = self._idle[0].idle_since + MAX_IDLE_S - now
            self._sweep = loop.call_later(max(due, 0.01), self._close_expired)

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
        return "\r\n".join(lines).encode() + body  # UTF-8 values, as aiohttp sent them

    async def _take(self) -> _Connection:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost and now - conn.idle_since < MAX_IDLE_S and not conn.readable():
                return conn
            conn.close()
        return await self._connect()

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
            name = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            lines = [f"CONNECT {name} HTTP/1.1", f"Host: {name}"]
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
