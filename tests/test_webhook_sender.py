"""One webhook POST against receivers that misbehave on a real socket: one that dribbles its
answer a byte at a time (each read within the timeout) is cut at the exchange's deadline, so
it cannot hold a sender, and its tenant's slot, for as long as it likes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from webhooks.sender import post

pytestmark = pytest.mark.unit


@pytest.fixture(params=[b"", b"HTTP/1.1 200 OK\r\n"], ids=["whole", "after-the-status"])
def dribbler(request: pytest.FixtureRequest) -> Iterator[str]:
    """A receiver that reads the request, then sends its answer a byte every 0.2 s (all of
    it, or after a 200 status line sent at once: a cut there read as a whole 200 with no
    headers, and the delivery was recorded delivered)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    head: bytes = request.param

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(head)
            for byte in b"X-Slow: 1\r\n" * 100 if head else b"HTTP/1.1 200 OK\r\n" * 100:
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return  # the sender hung up: what this test looks for

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        stop.set()
        server.close()


def test_a_dribbling_receiver_is_cut_at_the_deadline(dribbler: str) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"the answer took longer than 1\.5s"):
        post(
            dribbler,
            b"{}",
            {},
            timeout_s=0.5,
            allow_private=True,
            max_response_bytes=4096,
        )
    assert time.monotonic() - started < 10  # not the ~17 s the whole dribble takes
