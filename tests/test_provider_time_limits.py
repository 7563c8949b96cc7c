"""An attempt's time limits in stream_once, against a real socket: a scripted server that sends
an SSE answer over time (keep-alive comments, texts, pauses), as relays do. The limits here:
the head within 0.5 s, the first text within 1.5 s of the call, then no gap over 1 s, and the
answer ended 1.5 s after its first text."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import orjson
import pytest

from streaming.provider_errors import Retryable
from streaming.provider_http import ProviderHttp
from tests.fixtures.stream_once import stream_with

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

KEEPALIVE = b": keep-alive\n\n"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
Script = Sequence[tuple[float, bytes]]  # (seconds to wait, then these bytes)


@pytest.fixture(params=[False, True], ids=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return "asyncio", {"use_uvloop": request.param}


def text(piece: str, index: int = 0) -> bytes:
    chunk = {"choices": [{"index": index, "delta": {"content": piece}}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


END = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'


async def run(
    script: Script, before_body: Callable[[], Awaitable[None]] | None = None
) -> tuple[str, str | None]:
    """Serve `script` once and stream it: (text, finish reason)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            writer.write(HEAD)
            for wait, data in script:
                await asyncio.sleep(wait)
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # the client gave up on the answer: what these tests look for
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = ProviderHttp(f"http://127.0.0.1:{port}/v1/chat/completions")
    try:
        return await stream_with(
            http,
            before_body=before_body,
            include_usage=False,
            timeout_s=0.5,
            idle_timeout_s=1.0,
            answer_max_s=1.5,
        )
    finally:
        http.close()
        server.close()


async def test_keep_alives_alone_are_no_answer() -> None:
    with pytest.raises(Retryable, match=r"no text for 1.5s after the call"):
        await run([(0.05, KEEPALIVE)] * 100)


async def test_keep_alives_while_the_first_text_takes_its_time() -> None:
    """The first text 1 s after the head (the old idle limit's worth), comments meanwhile."""
    assert await run([(0.1, KEEPALIVE)] * 10 + [(0, text("late")), (0, END)]) == ("late", "stop")


async def test_keep_alives_after_text_are_a_stall() -> None:
    with pytest.raises(Retryable, match=r"stream stalled: no text for 1s"):
        await run([(0, text("a "))] + [(0.05, KEEPALIVE)] * 100)


async def test_a_trickle_ends_at_the_answer_limit_with_what_came() -> None:
    got, finish = await run([(0.2, text(f"{i} ")) for i in range(30)] + [(0, END)])
    assert finish == "length"
    assert got.startswith("0 1 2 3 ") and "29" not in got, got


async def test_nothing_fires_while_the_grant_is_awaited() -> None:
    """A claim slower than every limit: the answer, waiting in the response, is read once the
    grant comes, and the first text's limit starts again then."""
    assert await run([(0, text("ok")), (0, END)], before_body=lambda: asyncio.sleep(2.0)) == (
        "ok",
        "stop",
    )


async def test_a_lone_choice_is_the_answer_whatever_its_index() -> None:
    end = END.replace(b'"index": 0', b'"index": 1')
    assert await run([(0, text("one", index=1)), (0, end)]) == ("one", "stop")


async def test_a_second_choice_is_not_spliced_in() -> None:
    script = [(0, text("a ")), (0, text("X ", index=1)), (0, text("b")), (0, END)]
    assert await run(script) == ("a b", "stop")
