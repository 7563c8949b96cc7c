"""Where a webhook may go: http(s) URLs whose host resolves only to public addresses (unless
SHEEPDOG_WEBHOOK_ALLOW_PRIVATE). Checked at registration and at every delivery, on the resolved
address, and the delivery connects to the very address checked (no second lookup to rebind)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

from core.errors import SheepdogError

MAX_URL_CHARS = 2000
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeURL(SheepdogError, ValueError):
    """A webhook URL Sheepdog will not call (scheme, form, or a non-public address)."""


class HostNotFound(OSError):
    """The host does not resolve (now): a delivery retries it; a registration refuses it."""


def parse_url(url: str) -> SplitResult:
    """The URL's parts, if its form is acceptable (no DNS): http(s), a host, no credentials."""
    if len(url) > MAX_URL_CHARS:
        raise UnsafeURL(f"webhook URL is {len(url)} characters, over the limit of {MAX_URL_CHARS}")
    if not url.isascii() or not url.isprintable():
        # No request line can carry it (a delivery would fail on every attempt); a name or
        # path in another script goes percent-encoded (IDNA for the host).
        raise UnsafeURL("webhook URL must be printable ASCII (percent-encode the rest)")
    try:
        parts = urlsplit(url)
    except ValueError as err:  # e.g. an unclosed IPv6 bracket
        raise UnsafeURL(f"webhook URL cannot be read: {err}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"webhook URL must be http or https, got {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise UnsafeURL("webhook URL has no host")
    if parts.username or parts.password:
        raise UnsafeURL("webhook URL must not carry credentials")
    if any(c.isspace() for c in url):
        raise UnsafeURL("webhook URL contains whitespace")
    try:
        port = parts.port
        parts.hostname  # noqa: B018  (raises on a bad host)
    except ValueError:
        raise UnsafeURL("webhook URL has an invalid port") from None
    if port == 0:  # no receiver listens there: every attempt would fail for the retry window
        raise UnsafeURL("webhook URL has port 0")
    return parts


def port_of(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052's well-known prefix
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215's local-use prefix
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # RFC 4291's deprecated ::a.b.c.d


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and reaches (IPv4-mapped, IPv4-compatible, 6to4,
    NAT64), else None."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64 or ip in NAT64_LOCAL or ip in IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """Globally routable and unicast: not private, loopback, link-local (169.254/16, the cloud
    metadata address), shared, reserved, multicast or unspecified. An IPv6 address that
    carries an IPv4 one (`::ffff:127.0.0.1`, `::127.0.0.1`, 6to4 `2002:7f00:1::`, NAT64
    `64:ff9b::7f00:1`) is judged as that IPv4 address too: a gateway on the way delivers it
    there."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None and not is_public(inner):
            return False
    return ip.is_global and not ip.is_multicast


def literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_form(url: str, *, allow_private: bool) -> None:
    """The checks that need no DNS (the edge of a submit): form, and a literal IP's range."""
    parts = parse_url(url)
    ip = literal_ip(parts.hostname or "")
    if ip is not None and not allow_private and not is_public(ip):
        raise UnsafeURL(f"webhook URL points at a non-public address ({ip})")


def resolve(url: str, *, allow_private: bool) -> IPAddress:
    """The address to connect to for `url`: every address its host resolves to must be public
    (unless allowed), and the first is returned. Raises UnsafeURL or HostNotFound."""
    parts = parse_url(url)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, port_of(parts), type=socket.SOCK_STREAM)
    except UnicodeError:
        raise UnsafeURL(f"webhook host {host!r} is not a valid name") from None
    except socket.gaierror as err:  # may pass: a delivery retries it
        raise HostNotFound(f"webhook host {host!r} does not resolve: {err.strerror}") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise HostNotFound(f"webhook host {host!r} does not resolve")
    if not allow_private:
        bad = [ip for ip in addresses if not is_public(ip)]
        if bad:
            raise UnsafeURL(f"webhook host {host!r} resolves to a non-public address ({bad[0]})")
    return addresses[0]
