"""The engine's provider HTTP client (streaming/provider_http.py) through stream_once, against
real sockets: scripted HTTP servers that answer as providers, relays and proxies do (chunked and
plain bodies, keep-alive, a connection closed while idle, cuts, gzip, TLS, CONNECT tunnels)."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from streaming import provider_http
from streaming.provider_errors import Fatal, Retryable
from streaming.provider_http import ProviderHttp, Unsendable
from tests.fixtures.stream_once import stream_with

pytestmark = [pytest.mark.unit, pytest.mark.anyio]


@pytest.fixture(params=[False, True], ids=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops: the engine runs on uvloop when it is installed."""
    return "asyncio", {"use_uvloop": request.param}


# A request -> the response's bytes and whether the server then closes the connection.
Answer = Callable[[bytes], Awaitable[tuple[bytes, bool]]]


def sse(*texts: str, done: bool = True) -> bytes:
    """An SSE body: one chunk a text, a finish chunk, then [DONE]."""
    out = b""
    for text in texts:
        chunk = {"choices": [{"index": 0, "delta": {"content": text}}]}
        out += b"data: " + orjson.dumps(chunk) + b"\n\n"
    out += b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunked(body: bytes, *, pieces: int = 3, end: bool = True) -> bytes:
    """`body` as a chunked HTTP/1.1 200 response (in `pieces` chunks)."""
    out = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    step = max(1, len(body) // pieces + 1)
    for i in range(0, len(body), step):
        part = body[i : i + step]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + (b"0\r\n\r\n" if end else b"")


class Server:
    """A scripted HTTP/1.1 server: each request is answered by `answer`; records the requests
    and how many connections it accepted."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.requests: list[bytes] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/v1/chat/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                response, close = await self.answer(request)
                writer.write(response)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def always(response: bytes, *, close: bool = False) -> Answer:
    async def answer(_: bytes) -> tuple[bytes, bool]:
        return response, close

    return answer


async def stream(
    url: str, proxy: str | None = None, ssl_context: ssl.SSLContext | None = None
) -> tuple[str, str | None]:
    """One stream_once through a fresh pool: (text, finish_reason)."""
    return await stream_with(ProviderHttp(url, proxy, ssl_context))


async def a_moment() -> None:
    """A grant that takes a while: the whole answer is in before it is read."""
    await asyncio.sleep(0.1)


async def test_a_chunked_answer_streams_and_its_connection_is_kept() -> None:
    async with Server(always(chunked(sse("Hel", "lo", " world"), pieces=7))) as server:
        http = ProviderHttp(server.url())
        assert await stream_with(http) == ("Hello world", "stop")
        assert await stream_with(http) == ("Hello world", "stop")
        assert server.connections == 1  # kept alive and reused
        request = server.requests[0]
        assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nAuthorization: Bearer k\r\n" in request
        assert b"\r\nAccept-Encoding: identity\r\n" in request
        body = orjson.loads(request.split(b"\r\n\r\n", 1)[1])
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_plain_and_close_delimited_bodies_and_an_interim_answer() -> None:
    body = sse("a", "b")
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    async with Server(always(plain)) as server:
        assert await stream(server.url()) == ("ab", "stop")
    # No length: the body runs until the server closes; [DONE] ends the answer.
    unsized = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body
    async with Server(always(unsized, close=True)) as server:
        assert await stream(server.url()) == ("ab", "stop")
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
    async with Server(always(hints + chunked(body))) as server:
        assert await stream(server.url()) == ("ab", "stop")


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    closing = chunked(sse("one")).replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n", 1)
    async with Server(always(closing)) as server:
        http = ProviderHttp(server.url())
        assert await stream_with(http) == ("one", "stop")
        for writer in server.writers:  # the server drops its idle keep-alive connection
            writer.transport.abort()
        await asyncio.sleep(0.05)
        assert await stream_with(http) == ("one", "stop")
        assert server.connections == 2


async def test_a_cut_a_missing_done_and_a_broken_response_are_retryable() -> None:
    cut = chunked(sse("x", "y"), end=False)[:-20]
    async with Server(always(cut, close=True)) as server:
        with pytest.raises(Retryable, match="stream cut"):
            await stream(server.url())
    async with Server(always(chunked(sse("x", done=False)))) as server:
        with pytest.raises(Retryable, match=r"closed before \[DONE\]"):
            await stream(server.url())
    async with Server(always(b"NOT HTTP AT ALL\r\n\r\n")) as server:
        with pytest.raises(Retryable, match="malformed HTTP response"):
            await stream(server.url())


async def test_an_error_answer_keeps_its_message_and_its_connection() -> None:
    body = b'{"error": {"message": "Invalid model", "type": "invalid_request_error"}}'
    bad = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    limited = b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\n{}"
    answers = iter([bad, limited])

    async def answer(_: bytes) -> tuple[bytes, bool]:
        return next(answers), False

    async with Server(answer) as server:
        http = ProviderHttp(server.url())
        with pytest.raises(Fatal, match="Invalid model"):
            await stream_with(http)
        with pytest.raises(Retryable) as raised:
            await stream_with(http)
        assert raised.value.retry_after == 3.0 and raised.value.status == 429
        assert server.connections == 1


async def test_a_gzipped_answer_is_read_and_a_header_that_cannot_be_sent_is_fatal() -> None:
    zipped = gzip.compress(sse("zip", "ped"))
    response = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(
        zipped
    )
    async with Server(always(response + zipped)) as server:
        assert await stream(server.url()) == ("zipped", "stop")
        with pytest.raises(Fatal, match="cannot be sent"):
            await stream_with(ProviderHttp(server.url()), {"Authorization": "Bearer k\r\nX: y"})
        assert len(server.requests) == 1  # nothing of the bad request went out


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (certificate, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def tls_contexts(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = certificate
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


async def test_tls_is_verified(certificate: tuple[Path, Path]) -> None:
    server_tls, client_tls = tls_contexts(certificate)
    async with Server(always(chunked(sse("secure"))), tls=server_tls) as server:
        assert await stream(server.url("https"), ssl_context=client_tls) == ("secure", "stop")
        with pytest.raises(Retryable, match="cannot reach the provider"):
            await stream(server.url("https"))  # the system's CAs do not know this certificate


@pytest.fixture
async def proxy() -> AsyncIterator[dict[str, object]]:
    """An HTTP proxy: CONNECT tunnels, and plain requests in absolute form forwarded."""
    seen: dict[str, object] = {"lines": []}

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        first = head.split(b"\r\n", 1)[0].decode()
        seen["lines"].append(first)  # type: ignore[attr-defined]
        seen["auth"] = b"Proxy-Authorization: Basic " in head
        method, target, _ = first.split(" ")
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            origin = target.split("/")[2]
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", origin.split(":")[1])
            up_writer.write(head)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    seen["url"] = f"http://user:secret@127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield seen
    server.close()


async def test_through_a_proxy_plain_and_tunnelled(
    proxy: dict[str, object], certificate: tuple[Path, Path]
) -> None:
    url = str(proxy["url"])
    async with Server(always(chunked(sse("via", " proxy")))) as server:
        assert await stream(server.url(), proxy=url) == ("via proxy", "stop")
        assert proxy["lines"] == [f"POST {server.url()} HTTP/1.1"] and proxy["auth"]
    server_tls, client_tls = tls_contexts(certificate)
    async with Server(always(chunked(sse("tun", "nel"))), tls=server_tls) as server:
        assert await stream(server.url("https"), proxy=url, ssl_context=client_tls) == (
            "tunnel",
            "stop",
        )
        assert proxy["lines"][-1] == f"CONNECT 127.0.0.1:{server.port} HTTP/1.1"  # type: ignore[index]


def test_only_http_proxies_and_http_urls_are_taken() -> None:
    with pytest.raises(Unsendable, match="not an http:// proxy"):
        ProviderHttp("https://api.example.com/v1/chat/completions", "socks5://proxy:1080")
    with pytest.raises(Unsendable, match="not an http"):
        ProviderHttp("ftp://api.example.com/v1/chat/completions")


async def test_an_error_in_an_answer_read_from_the_buffer_keeps_its_kind() -> None:
    event = b'data: {"error": {"message": "content policy", "type": "invalid_request_error"}}\n\n'
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(event) + event
    async with Server(always(whole)) as server:
        with pytest.raises(Fatal, match="content policy"):
            await stream_with(ProviderHttp(server.url()), before_body=a_moment)
        with pytest.raises(Fatal, match="content policy"):
            await stream(server.url())


async def test_an_error_answer_without_a_length_keeps_its_status() -> None:
    body = b'{"error": {"message": "Invalid model"}}'
    async with Server(
        always(b"HTTP/1.1 400 Bad\r\nConnection: close\r\n\r\n" + body, close=True)
    ) as server:
        with pytest.raises(Fatal, match="Invalid model"):
            await stream(server.url())
    limited = b"HTTP/1.0 429 Too Many\r\nRetry-After: 2\r\n\r\n{}"
    async with Server(always(limited, close=True)) as server:
        with pytest.raises(Retryable) as raised:
            await stream(server.url())
        assert raised.value.status == 429 and raised.value.retry_after == 2.0


async def test_a_request_is_never_sent_twice() -> None:
    answers = iter([chunked(sse("first")), b""])

    async def answer(_: bytes) -> tuple[bytes, bool]:
        response = next(answers)
        if not response:
            await asyncio.sleep(0.2)  # works on it, then the connection drops
        return response, not response

    async with Server(answer) as server:
        http = ProviderHttp(server.url())
        assert await stream_with(http) == ("first", "stop")
        with pytest.raises(Retryable, match="cannot reach the provider"):
            await stream_with(http)
        assert len(server.requests) == 2  # the second call's request went out once


async def test_compressed_answers_corrupt_ones_and_a_protocol_switch() -> None:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # raw deflate, as many servers send it
    raw = packer.compress(sse("de", "flate")) + packer.flush()
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n"
    async with Server(always(head % len(raw) + raw)) as server:
        assert await stream(server.url()) == ("deflate", "stop")
    # Deflate as the standard says (zlib-wrapped), its first HTTP chunk a single byte.
    wrapped = zlib.compress(sse("zl", "ib"))
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n"
    rest = wrapped[1:]
    split = head + b"1\r\n" + wrapped[:1] + b"\r\n%x\r\n" % len(rest) + rest + b"\r\n0\r\n\r\n"
    async with Server(always(split)) as server:
        assert await stream(server.url()) == ("zlib", "stop")
    junk = b"\x1f\x8b\x08\x00not gzip at all"
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
    async with Server(always(head % len(junk) + junk)) as server:
        with pytest.raises(Retryable, match="compressed answer is corrupt"):
            await stream(server.url())
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    async with Server(always(switch)) as server:
        with pytest.raises(Retryable, match="switched protocols"):
            await stream(server.url())


async def test_a_large_answer_waits_for_its_reader_and_arrives_whole() -> None:
    texts = [f"{i:05d}" + "x" * 995 for i in range(3000)]  # ~3.5 MB of SSE: past BUFFER_LIMIT
    async with Server(always(chunked(sse(*texts), pieces=400))) as server:
        text, finish = await stream_with(ProviderHttp(server.url()), before_body=a_moment)
        assert text == "".join(texts) and finish == "stop"


async def test_idle_connections_are_closed_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provider_http, "MAX_IDLE_S", 0.2)
    async with Server(always(chunked(sse("x")))) as server:
        http = ProviderHttp(server.url())
        await asyncio.gather(*(stream_with(http) for _ in range(4)))
        assert len(http._idle) == 4
        await asyncio.sleep(0.5)
        assert len(http._idle) == 0


async def test_a_tls_connection_the_server_closed_is_not_reused(
    certificate: tuple[Path, Path],
) -> None:
    server_tls, client_tls = tls_contexts(certificate)
    async with Server(always(chunked(sse("again"))), tls=server_tls) as server:
        http = ProviderHttp(server.url("https"), ssl_context=client_tls)
        assert await stream_with(http) == ("again", "stop")
        for writer in server.writers:  # close_notify, then the close
            writer.close()
        await asyncio.sleep(0.05)
        assert await stream_with(http) == ("again", "stop")
        assert server.connections == 2


async def test_a_finish_reason_is_kept_to_what_the_row_holds() -> None:
    """A relay may name any finish reason: the row's column holds 32 characters and no NUL."""
    odd = {"choices": [{"index": 0, "delta": {}, "finish_reason": "x\x00" + "y" * 100}]}
    body = sse("Hi")[: -len(b"data: [DONE]\n\n")] + b"data: " + orjson.dumps(odd) + b"\n\n"
    body += b"data: [DONE]\n\n"
    async with Server(always(chunked(body))) as server:
        text, finish = await stream(server.url())
    assert text == "Hi"
    assert finish == ("x\ufffd" + "y" * 100)[:32]


def chunks(*objects: object) -> bytes:
    """An SSE body of these chunk objects, then [DONE]."""
    body = b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objects)
    return body + b"data: [DONE]\n\n"


async def test_content_given_as_parts_is_read_and_other_shapes_are_malformed() -> None:
    parts = {"choices": [{"index": 0, "delta": {"content": [{"type": "text", "text": "Hi"}]}}]}
    async with Server(always(chunked(chunks(parts)))) as server:
        assert (await stream(server.url()))[0] == "Hi"
    for odd in (
        {"choices": [{"index": 0, "delta": {"content": 5}}]},
        {"choices": [{"index": 0, "delta": ["x"]}]},
        None,
        3,
    ):
        async with Server(always(chunked(chunks(odd)))) as server:
            with pytest.raises(Retryable, match="malformed chunk"):
                await stream(server.url())


async def test_an_endless_line_is_refused_before_it_stalls_the_loop() -> None:
    line = b"data: " + b"x" * (2 << 20)  # no line break: a line the reader must hold
    async with Server(always(chunked(line, pieces=64, end=True))) as server:
        with pytest.raises(Retryable, match="over 1048576 bytes"):
            await stream(server.url())
