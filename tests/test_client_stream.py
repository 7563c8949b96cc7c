"""sheepdog-client's event streams through the real front door: a connection cut mid-answer by a
real TCP proxy resumes with Last-Event-ID (no gap, no duplicate, the row's text), a retried
stream's `reset` is applied, and the async twins do the same."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sheepdog_client import (
    AsyncClient,
    Client,
    InvalidRequest,
    NotFound,
    RequestFailed,
    RequestView,
    WaitTimeout,
)

from tests.fixtures.api import ApiServer
from tests.fixtures.tcp_proxy import port_of, tcp_proxy

MODEL = "gpt-4.1-mini"


def ask(prompt: str, **fields: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}


def succeeded(view: RequestView) -> RequestView:
    assert view.status == "succeeded", f"{view.id} ended {view.status}: {view.error}"
    return view


def test_stream_resumes_after_a_cut_connection(api_server: ApiServer, simulator) -> None:  # type: ignore[no-untyped-def]
    tag = f"cut-{uuid.uuid4().hex[:8]}"
    # The cuts need the answer still in flight when the client reads seq 3 and 8: chunks 200 ms
    # apart keep it so for seconds, however late a loaded box lets the client read.
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 200}])
    key = api_server.key()
    with tcp_proxy(port_of(api_server.url)) as proxy, Client(proxy.url, api_key=key) as client:
        rid = client.submit(ask(f"{tag} a long answer please"), priority="high")
        stream = client.stream(rid)
        seqs: list[int] = []
        cut_at: list[int] = []
        for event in stream:
            seqs.append(event.seq)
            if event.type == "token" and len(cut_at) < 2 and event.seq in (3, 8):
                cut_at.append(event.seq)
                assert proxy.cut() >= 2  # the event stream's connection, both sides
        assert cut_at == [3, 8], "the answer ended before the cuts (too short an answer?)"
        assert stream.reconnects >= 2 and proxy.connections >= 3
        assert seqs == list(range(len(seqs)))  # no gap, no duplicate across the resumes
        assert stream.final is not None and stream.final.type == "done"
        view = succeeded(client.result(rid, wait=30))
    assert stream.text == view.text


def test_a_retried_stream_resets_its_text(api_server: ApiServer, simulator) -> None:  # type: ignore[no-untyped-def]
    tag = f"retry-{uuid.uuid4().hex[:8]}"
    # The provider drops the first attempt after 5 chunks: the worker retries and publishes reset.
    simulator.set_faults([{"match": tag, "cut_after": 5, "first": 1}])
    with Client(api_server.url, api_key=api_server.key()) as client:
        rid = client.submit(ask(f"{tag} answer twice"), priority="high")
        stream = client.stream(rid)
        kinds = [e.type for e in stream]
        view = succeeded(client.result(rid, wait=60))
    assert "reset" in kinds and kinds[-1] == "done"
    assert kinds.index("reset") > kinds.index("token")
    assert stream.text == view.text  # the first attempt's pieces were dropped


def test_async_twins(api_server: ApiServer, simulator) -> None:  # type: ignore[no-untyped-def]
    tag = f"async-{uuid.uuid4().hex[:8]}"
    simulator.set_faults([{"match": f"{tag} slow", "chunk_delay_ms": 200}])

    async def main() -> None:
        key = api_server.key()
        async with AsyncClient(api_server.url, api_key=key) as client:
            rid = await client.submit(ask(f"{tag} hello"), priority="high")
            text = await client.stream_text(rid)
            view = succeeded(await client.result(rid, wait=30))
            assert text == view.text and (await client.get(rid)).text == text

            ids = await client.submit_many([ask(f"{tag} {i}") for i in range(3)])
            views = await asyncio.gather(*(client.result(i, wait=60) for i in ids))
            assert [succeeded(v).id for v in views] == ids
            page = await client.list(limit=10)
            assert {v.id for v in page.data} == {rid, *ids} and page.next_cursor is None

            slow = await client.submit(ask(f"{tag} slow"), priority="high")
            stream = client.stream(slow)
            async for event in stream:
                if event.type == "token":
                    break
            assert (await client.cancel(slow)).cancelled
            with pytest.raises(RequestFailed, match="cancelled"):
                await stream.final_text()

            with pytest.raises(NotFound):
                await client.get("req_" + "0" * 32)
            with pytest.raises(InvalidRequest):
                await client.submit(ask("x"), priority="urgent")

    asyncio.run(main())


def test_async_stream_resumes_after_a_cut(api_server: ApiServer, simulator) -> None:  # type: ignore[no-untyped-def]
    tag = f"acut-{uuid.uuid4().hex[:8]}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 40}])

    async def main() -> tuple[str, list[int], int, str]:
        with tcp_proxy(port_of(api_server.url)) as proxy:
            async with AsyncClient(proxy.url, api_key=api_server.key()) as client:
                rid = await client.submit(ask(f"{tag} a long answer"), priority="high")
                stream = client.stream(rid)
                seqs = []
                async for event in stream:
                    seqs.append(event.seq)
                    if event.seq == 4:
                        proxy.cut()
                view = succeeded(await client.result(rid, wait=30))
                return stream.text, seqs, stream.reconnects, view.text or ""

    text, seqs, reconnects, row_text = asyncio.run(main())
    assert reconnects >= 1 and seqs == list(range(len(seqs))) and len(seqs) > 5
    assert text == row_text


def test_an_ended_stream_leaves_its_connection_for_the_next_call(
    api_server: ApiServer, simulator
) -> None:  # type: ignore[no-untyped-def]
    """Submit, follow to the end, twice, then read back: one connection for all of it, sync and
    async (a stream left half-read at its end closes its connection, and every next call
    paid a new one)."""
    tag = f"reuse-{uuid.uuid4().hex[:8]}"
    key = api_server.key()
    with tcp_proxy(port_of(api_server.url)) as proxy, Client(proxy.url, api_key=key) as client:
        for i in range(2):
            rid = client.submit(ask(f"{tag} sync {i}"), priority="high")
            text = client.stream_text(rid)
        assert text == succeeded(client.result(rid, wait=30)).text
        assert proxy.connections == 1

    async def main() -> int:
        with tcp_proxy(port_of(api_server.url)) as proxy:
            async with AsyncClient(proxy.url, api_key=key) as client:
                for i in range(2):
                    rid = await client.submit(ask(f"{tag} async {i}"), priority="high")
                    text = await client.stream_text(rid)
                assert text == succeeded(await client.result(rid, wait=30)).text
            return proxy.connections

    assert asyncio.run(main()) == 1


def test_text_with_unicode_line_separators_streams_whole(api_server: ApiServer, simulator) -> None:  # type: ignore[no-untyped-def]
    """U+2028, U+2029 and U+0085 travel unescaped in the events' JSON: only CR and LF end an
    event-stream line (a client splitting as str.splitlines did cut the JSON and raised)."""
    tag = f"seps-{uuid.uuid4().hex[:8]}"
    odd = "a\u2028b\u2029c\x85d\x1ce"
    simulator.set_faults([{"match": tag, "append_text": odd}])
    key = api_server.key()
    with Client(api_server.url, api_key=key) as client:
        rid = client.submit(ask(f"{tag} sync"), priority="high")
        text = client.stream_text(rid)
        assert text.endswith(odd) and text == succeeded(client.result(rid, wait=30)).text

    async def main() -> tuple[str, str]:
        async with AsyncClient(api_server.url, api_key=key) as client:
            rid = await client.submit(ask(f"{tag} async"), priority="high")
            text = await client.stream_text(rid)
            return text, succeeded(await client.result(rid, wait=30)).text or ""

    text, row = asyncio.run(main())
    assert text.endswith(odd) and text == row


def test_a_follow_timeout_bounds_a_stream_still_sending(api_server: ApiServer, simulator) -> None:  # type: ignore[no-untyped-def]
    """`stream(timeout=)` bounds the whole follow, also while tokens keep coming (each read's
    timeout restarts with every token, so a check before each connection alone let it run to
    the answer's end)."""
    tag = f"bound-{uuid.uuid4().hex[:8]}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 300}])
    key = api_server.key()
    with Client(api_server.url, api_key=key) as client:
        rid = client.submit(ask(f"{tag} a long answer please"), priority="high")
        stream = client.stream(rid, timeout=0.6)
        with pytest.raises(WaitTimeout):
            for _ in stream:
                pass
        assert stream.final is None  # raised while the answer was still streaming
        client.cancel(rid)

    async def main() -> object:
        async with AsyncClient(api_server.url, api_key=key) as client:
            rid = await client.submit(ask(f"{tag} async, a long answer please"), priority="high")
            stream = client.stream(rid, timeout=0.6)
            with pytest.raises(WaitTimeout):
                async for _ in stream:
                    pass
            await client.cancel(rid)
            return stream.final

    assert asyncio.run(main()) is None


def test_a_redirect_or_a_page_is_an_error_where_it_happens() -> None:
    """A base URL that is not the front door's (a redirect, a proxy's HTML page with 200)
    raised nothing at the call: `submit` failed later on a missing id, `get` on validation."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sheepdog_client import SheepdogError

    class Odd(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if "redirect" in self.path:
                self.send_response(302)
                self.send_header("Location", "https://login.example/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            page = b"<html>a proxy's page</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{server.server_port}", api_key="k") as client:
            with pytest.raises(SheepdogError, match="not JSON"):
                client.get("req_page")
            with pytest.raises(
                SheepdogError, match=r"HTTP 302 from the server \(to https://login\.example/\)"
            ):
                client.get("req_redirect")
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_never_answers_is_a_failed_attempt() -> None:
    """A read timeout before any answer (the server accepts the connection and is hung) counts
    as a broken attempt; one after the headers is a quiet wait. Both were quiet waits, so a hung
    server was reconnected to without end."""
    import socket
    import threading

    from sheepdog_client import APIConnectionError

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with (
            Client(base, api_key="k", timeout=0.2, max_reconnects=2) as client,
            pytest.raises(APIConnectionError, match="broke 3 times in a row"),
        ):
            client.stream("req_" + "0" * 32, timeout=20).final_text()

        async def follow() -> None:
            async with AsyncClient(base, api_key="k", timeout=0.2, max_reconnects=2) as client:
                stream = client.stream("req_" + "0" * 32, timeout=20)
                with pytest.raises(APIConnectionError, match="broke 3 times in a row"):
                    await stream.final_text()

        asyncio.run(follow())
        assert len(held) == 6, "each attempt opens one connection"
    finally:
        listener.close()
        for conn in held:
            conn.close()


# -- the pieces without a server: the SSE format and the error table --------------------------


@pytest.mark.unit
def test_sse_decoder_follows_the_format() -> None:
    from sheepdog_client._sse import SSEDecoder

    decoder = SSEDecoder()
    lines = [
        "retry: 1000",
        "",  # no data: nothing dispatched, the retry kept
        ": keepalive",
        "id: 7",
        "event: token",
        "data: line one",
        "data:line two",
        "",
        "data: no id or event",
        "",
    ]
    events = [e for e in map(decoder.feed, lines) if e is not None]
    assert [(e.event, e.data, e.id) for e in events] == [
        ("token", "line one\nline two", "7"),
        ("message", "no id or event", "7"),  # the last event id persists
    ]
    assert decoder.retry_ms == 1000
    decoder.feed("retry: ²")  # not ASCII digits: ignored
    assert decoder.retry_ms == 1000
    decoder.feed("data: half an event")
    decoder.new_connection()  # a dropped connection loses the half-read event
    assert decoder.feed("") is None


@pytest.mark.unit
def test_lines_break_at_cr_lf_and_crlf_only() -> None:
    from sheepdog_client._sse import LineSplitter

    def lines(*chunks: bytes) -> list[str]:
        splitter = LineSplitter()
        return [line for chunk in chunks for line in splitter.feed(chunk)]

    sep = "data: a\u2028b\x85c".encode()
    assert lines(sep + b"\n\n") == ["data: a\u2028b\x85c", ""]
    assert lines(b"one\r", b"\ntwo\rthree\n", b"\n") == ["one", "two", "three", ""]
    assert lines(b"one\r", b"", b"\r\n") == ["one", ""]  # an empty chunk keeps the CR's pair
    assert lines(b"\xef\xbb", b"\xbfretry: 5\n") == ["retry: 5"]  # a BOM split in two
    assert lines(b"x\n\xef\xbb\xbfy\n") == ["x", "\ufeffy"]  # only a leading one is dropped
    assert lines(b"data: \xe2\x80", b"\xa8\n") == ["data: \u2028"]  # a character split in two
    assert lines(b"no break at the end") == []


@pytest.mark.unit
def test_error_answers_map_to_the_exception_classes() -> None:
    from sheepdog_client import (
        AuthenticationError,
        BudgetExceeded,
        Conflict,
        InvalidRequest,
        NotFound,
        RateLimited,
        SheepdogError,
        Unavailable,
    )
    from sheepdog_client.errors import error_from_response

    def err(status: int, code: str | None = None, **headers: str) -> SheepdogError:
        body = {"error": {"message": "m", "type": "t", "param": None, "code": code}}
        return error_from_response(
            status, body, {k.replace("_", "-"): v for k, v in headers.items()}
        )

    expected = {
        400: InvalidRequest,
        401: AuthenticationError,
        402: BudgetExceeded,
        404: NotFound,
        409: Conflict,
        413: InvalidRequest,
        429: RateLimited,
        503: Unavailable,
    }
    for status, cls in expected.items():
        e = err(status)
        assert type(e) is cls and e.status == status and e.message == "m" and e.type == "t"
    limited = err(429, "rate_limit_exceeded", retry_after="3")
    assert isinstance(limited, RateLimited) and limited.retry_after == 3.0
    # No number, or none a sleep can take: the client backs off on its own; a long one is capped.
    for odd in ("inf", "nan", "1e999", "Wed, 21 Oct 2026 07:28:00 GMT"):
        assert err(429, retry_after=odd).retry_after is None  # type: ignore[attr-defined]
    assert err(429, retry_after="86400").retry_after == 60.0  # type: ignore[attr-defined]
    assert isinstance(err(429, "budget_exceeded"), BudgetExceeded)
    plain = error_from_response(502, "<html>bad gateway</html>", {})
    assert isinstance(plain, Unavailable) and plain.code is None
