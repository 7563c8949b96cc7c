"""The provider's HTTP/1.1 client on the engine's loop: one POST, its response read by callbacks.

A stream's chunks arrive 10,000 a second under load, each in its own packet. aiohttp handed each
one to the stream's task through its payload reader and async iterators, a task wakeup a chunk:
~23 µs of CPU a chunk on this box, against ~11 µs here (bench/bench_provider_read.py, 1,000
concurrent streams, the request and its SSE parsing included). So the body goes from the socket
to a sink called on the loop, and the stream's task wakes once, at the end. The HTTP parsing is
httptools' (llhttp, as uvicorn's); a response's side is streaming/provider_response.py. This
module keeps connections (LIFO, one origin a pool), writes the request, and tunnels through an
HTTP proxy (CONNECT) when the environment names one.

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
from collections.abc import Mapping

import httptools

from streaming.provider_response import Response, ResponseCut

MAX_IDLE_S = 15.0  # an idle connection older than this is closed, not reused (aiohttp's)
_FORBIDDEN = ("host", "content-length", "transfer-encoding", "connection", "accept-encoding")


class Unsendable(ValueError):
    """The request cannot be written (a header with a line break in it)."""


class _Connection(asyncio.Protocol):
    """One connection of a pool; at most one response at a time."""

    def __init__(self, pool: ProviderHttp) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
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
        if sock is None:
            return True
        poll = getattr(select, "poll", None)
        if poll is None:  # no poll (Windows): the loop's own view (lost, closing) has to do
            return False
        try:
            poller = poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (ValueError, OSError):  # a socket closed meanwhile (fileno -1)
            return True

    # -- use -------------------------------------------------------------------------------

    def send(self, request: bytes) -> Response:
        assert self.transport is not None
        self.response = Response(self)
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

    def expire(self, response: Response) -> None:
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
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        default_port = 443 if self.https else 80
        self.port = parts.port or default_port
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_port = f"{name}:{self.port}"  # what a CONNECT names
        self.authority = name if self.port == default_port else self.host_port
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
        self._head: tuple[Mapping[str, str], bytes] | None = None  # headers -> their lines
        self._idle: collections.deque[_Connection] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None

    async def post(self, body: bytes, headers: Mapping[str, str]) -> Response:
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
        # An endpoint sends the same headers every time: checked and written once for them.
        if self._head is None or self._head[0] is not headers:
            self._head = (headers, self._head_for(headers))
        return b"%sContent-Length: %d\r\n\r\n%s" % (self._head[1], len(body), body)

    def _head_for(self, headers: Mapping[str, str]) -> bytes:
        """The request's head up to its Content-Length line."""
        lines = [f"POST {self.target} HTTP/1.1", f"Host: {self.authority}"]
        for name, value in headers.items():
            if name.lower() in _FORBIDDEN:
                continue
            if not name or any(c in name for c in ":\r\n\0 ") or any(c in value for c in "\r\n\0"):
                raise Unsendable(f"header {name!r} cannot be sent")
            lines.append(f"{name}: {value}")
        if self.proxy_auth is not None and not self.https:
            lines.append(f"Proxy-Authorization: {self.proxy_auth}")
        lines += ["Accept-Encoding: identity", ""]
        return "\r\n".join(lines).encode()  # UTF-8 values, as aiohttp sent them

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
        transport, conn = await loop.create_connection(
            lambda: _Connection(self), self.proxy.hostname or "", self.proxy.port or 80
        )
        if not self.https:
            return conn
        try:
            lines = [f"CONNECT {self.host_port} HTTP/1.1", f"Host: {self.host_port}"]
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
