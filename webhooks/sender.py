"""One HTTP POST to a webhook receiver, with the safety rules: connect to the address that was
checked (Host and TLS SNI keep the name), a short timeout on connect and on each read, no
redirects (http.client never follows one; a 3xx is a failed attempt), and at most a few KB of
the answer read."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from rules.addresses import IPAddress, parse_url, port_of, resolve


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a fixed address, verifying the certificate for the URL's host name."""

    def __init__(self, address: str, port: int, hostname: str, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(address, port, timeout=timeout, context=self._tls)
        self._hostname = hostname

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._hostname)


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_s: float,
    allow_private: bool,
    max_response_bytes: int,
) -> Response:
    """POST `body`; raises UnsafeURL (refused address), OSError/TimeoutError (connection or
    read failure) or http.client.HTTPException (a broken answer)."""
    parts = parse_url(url)
    address: IPAddress = resolve(url, allow_private=allow_private)
    port = port_of(parts)
    hostname = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = _PinnedHTTPS(str(address), port, hostname, timeout_s)
    else:
        conn = http.client.HTTPConnection(str(address), port, timeout=timeout_s)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host_header = parts.netloc.rsplit("@", 1)[-1]
    # The whole exchange (connect, TLS, the status line, the headers, the body) has a deadline:
    # each read is bounded by the timeout, but a receiver dribbling a byte a second would hold
    # the sender (and its slot) for as long as it liked. At the deadline the socket is shut
    # down under whatever read is waiting.
    limit_s = 3 * timeout_s
    deadline = time.monotonic() + limit_s
    watchdog = _Watchdog(conn, limit_s)
    try:
        conn.request(
            "POST",
            path,
            body=body,
            headers={
                **headers,
                "Host": host_header,
                "Content-Type": "application/json",
                "User-Agent": "Sheepdog-Webhooks/1",
            },
        )
        resp = conn.getresponse()
        data = b""
        while len(data) < max_response_bytes and time.monotonic() < deadline:
            chunk = resp.read1(max_response_bytes - len(data)) if not resp.closed else b""
            if not chunk:
                break
            data += chunk
        if watchdog.fired:  # cut under a read that then saw an end: the answer is not whole
            raise TimeoutError(f"the answer took longer than {limit_s:g}s")
        return Response(resp.status, data)
    except (OSError, http.client.HTTPException) as err:
        if watchdog.fired:
            raise TimeoutError(f"the answer took longer than {limit_s:g}s") from err
        if isinstance(err, TimeoutError):
            raise TimeoutError(f"no answer within {timeout_s:g}s") from err
        raise
    finally:
        watchdog.cancel()
        conn.close()


class _Watchdog:
    """Shuts a connection's socket down after `seconds` (a blocked read then returns)."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float) -> None:
        self.conn = conn
        self.fired = False
        self.timer = threading.Timer(seconds, self._cut)
        self.timer.daemon = True
        self.timer.start()

    def _cut(self) -> None:
        self.fired = True
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self.timer.cancel()
