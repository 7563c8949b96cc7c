"""The stream engine: the process that runs every stream of one Celery worker process.

The `sheepdog.stream` task hands its request to the engine over a local socket and waits for how
it ended (streaming/engine_client.py), so Flower still sees one task per stream while the
consumer keeps its process, and its GIL, to itself: under a burst it takes messages off the
queue at stock Celery's pace instead of sharing a core with every stream's chunks, and the
engine's loop runs the streams without a thousand task threads and the consumer cutting in.

The frames and errors both sides share are in streaming/engine_wire.py.

The engine lives as long as its parent: it ignores the signals that ask a worker to stop (a
warm shutdown lets the running streams end, and they need the engine until then), watches its
stdin (a pipe from the parent) and exits when that ends, however the parent went (a SIGKILL
too): a stream whose task is gone is the janitor's, as it was when the streams ran inside the
worker. Only its parent may connect (SO_PEERCRED).

Run: ``python -m streaming.engine ADDRESS`` (the parent does it; ADDRESS is a Unix socket path,
or `@name` for Linux's abstract namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
from typing import Any

from core.heap import freeze_startup_heap
from core.settings import get_settings
from streaming.engine_wire import HEADER, MAX_FRAME, READY, error_answer, frame, socket_address
from streaming.runner import run_stream
from streaming.runtime import Runtime

log = logging.getLogger("sheepdog.streaming.engine")

# The loop shares the GIL only with the writer's database threads; at the default 5 ms switch
# interval a busy one holds the loop (and every chunk waiting on it) for up to 5 ms.
SWITCH_INTERVAL_S = 0.0005


async def answer(runtime: Runtime, ask: dict[str, Any]) -> dict[str, Any]:
    """Run one asked stream; how it ended, or what the task should raise."""
    try:
        ended = await run_stream(
            runtime,
            str(ask["id"]),
            ask.get("item"),
            overlap=bool(ask.get("overlap", True)),
            started=ask.get("started"),
        )
    except Exception as err:
        reply = error_answer(err)
        if reply["raise"] == "error":
            log.exception("%s: stream failed", ask.get("id"))
        return reply
    return {"ended": ended}


async def _serve_connection(
    runtime: Runtime, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One connection of the parent's: one stream after another."""
    try:
        if not _from_parent(writer.get_extra_info("socket")):
            log.warning("stream engine: a connection not from its worker refused")
            return
        while True:
            size = int.from_bytes(await reader.readexactly(HEADER), "big")
            if size > MAX_FRAME:
                log.error("stream engine: an ask of %d bytes refused", size)
                return
            ask = json.loads(await reader.readexactly(size))
            writer.write(frame(await answer(runtime, ask)))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the thread went away (its process is ending)
    finally:
        writer.close()


def _from_parent(sock: socket.socket | None) -> bool:
    """True when the peer of `sock` is this engine's parent (Linux: SO_PEERCRED; elsewhere the
    socket file's permissions keep others out)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return sock is not None
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, 12))
    return pid == os.getppid()


def _exit_with_parent(loop: asyncio.AbstractEventLoop) -> None:
    """Leave at once when stdin (the parent's pipe) ends."""

    def readable() -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            log.info("stream engine: the worker went away; exiting")
            os._exit(0)

    loop.add_reader(0, readable)


async def serve(address: str) -> None:
    """Start the runtime, serve `address`, say ready on stdout, and run until the parent goes."""
    settings = get_settings()
    runtime = Runtime(settings, trace=bool(os.environ.get("SHEEPDOG_STREAM_TRACE")))
    await runtime.start()
    server = await asyncio.start_unix_server(
        lambda r, w: _serve_connection(runtime, r, w), path=socket_address(address), backlog=4096
    )
    _exit_with_parent(asyncio.get_running_loop())
    freeze_startup_heap()
    os.write(1, READY)
    os.dup2(2, 1)  # the parent has closed its end: anything printed goes to the log
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    level = os.environ.get("SHEEPDOG_ENGINE_LOGLEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format="[%(asctime)s: %(levelname)s/StreamEngine-%(process)d] %(message)s",
        stream=sys.stderr,
    )
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the worker's to act on; the engine leaves with it
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args[0]))


if __name__ == "__main__":
    main()
