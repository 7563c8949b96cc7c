"""The task's side of the stream engine (streaming/engine.py): start it, hand it streams.

One engine per Celery worker process that runs stream tasks, started with the worker (or on the
first stream in a prefork child) and started again should it die. A task takes a connection to
it from a pool (opened on first need, kept for the next stream) and waits there for its
stream's end, so the thread costs the consumer's process nothing while the stream runs.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import selectors
import site
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from streaming.engine_wire import HEADER, MAX_FRAME, READY, frame, socket_address
from streaming.store import Unavailable

log = logging.getLogger("sheepdog.streaming.engine")

START_TIMEOUT_S = 60.0
START_BACKOFF_S = 5.0  # after a start that failed, streams are sent back this long at once


class EngineError(Exception):
    """The engine met an error it could not sort (logged there); the task fails with it."""


class Engine:
    """This process's stream engine."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._address = ""
        self._generation = 0
        self._idle: queue.LifoQueue[tuple[socket.socket, int]] = queue.LifoQueue()
        self._failed_at = -START_BACKOFF_S  # monotonic time of the last start that failed

    # -- the process -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine unless it runs; returns once it serves."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            if time.monotonic() - self._failed_at < START_BACKOFF_S:
                raise Unavailable("the stream engine failed to start a moment ago")
            if self._proc is not None:
                log.error("stream engine exited (%s); starting another", self._proc.returncode)
                self._proc = None
            self._close_idle()  # connections to the engine that has gone
            try:
                self._proc, self._address = _spawn()
            except Exception:
                self._failed_at = time.monotonic()
                raise
            self._generation += 1

    def _close_idle(self) -> None:
        while True:
            try:
                sock, _ = self._idle.get_nowait()
            except queue.Empty:
                return
            sock.close()

    # -- one stream ------------------------------------------------------------------------

    def run(
        self, request_id: str, item: dict[str, Any] | None, *, overlap: bool, started: float
    ) -> str:
        """Have the engine stream `request_id`; how it ended. Raises Unavailable when the
        engine or the database is away (the task sends itself again), EngineError else."""
        ask = frame({"id": request_id, "item": item, "overlap": overlap, "started": started})
        if len(ask) > MAX_FRAME + HEADER:
            raise EngineError(f"the request is too large for the stream engine ({len(ask)} bytes)")
        sock: socket.socket | None = None
        try:
            sock, generation = self._take()
            sock.sendall(ask)
            answer = json.loads(_read(sock, int.from_bytes(_read(sock, HEADER), "big")))
        except OSError as err:
            if sock is not None:
                sock.close()
            try:
                self.start()  # when the engine has gone: another, and the pool's sockets dropped
            except Exception as restart:
                log.error("stream engine could not be started again: %r", restart)
            raise Unavailable(f"stream engine unreachable: {err!r}") from err
        except BaseException:
            # Cut off between the ask and its answer (a time limit, an interrupt): the answer
            # may still come on this socket, so it is nobody's to reuse.
            if sock is not None:
                sock.close()
            raise
        self._idle.put((sock, generation))
        if "ended" in answer:
            return str(answer["ended"])
        if answer.get("raise") == "unavailable":
            raise Unavailable(str(answer.get("message")))
        raise EngineError(str(answer.get("message")))

    def _take(self) -> tuple[socket.socket, int]:
        """An open connection to the running engine (a new one when none is idle)."""
        while True:
            try:
                sock, generation = self._idle.get_nowait()
            except queue.Empty:
                break
            if generation == self._generation:
                return sock, generation
            sock.close()  # to an engine that has gone
        self.start()  # a no-op while it runs; another one if it died
        generation = self._generation
        return self._connect(), generation

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(None)  # a stream lasts as long as it lasts, whatever the default is
        try:
            sock.connect(socket_address(self._address))
        except OSError:
            sock.close()
            raise
        return sock


def _read(sock: socket.socket, size: int) -> bytes:
    parts: list[bytes] = []
    while size:
        data = sock.recv(size)
        if not data:
            raise ConnectionResetError("the stream engine closed the connection")
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


def _spawn() -> tuple[subprocess.Popen[bytes], str]:
    """A new engine process, once it serves; (process, address)."""
    token = f"sheepdog-engine-{os.getpid()}-{secrets.token_hex(4)}"
    address = f"@{token}" if sys.platform == "linux" else str(Path("/tmp") / f"{token}.sock")
    env = dict(os.environ)
    # Sheepdog's packages found where this process found them, whatever the working directory
    # (-P: the directory itself is not searched, so nothing in it shadows them or the stdlib).
    root = str(Path(__file__).resolve().parent.parent)
    if root not in site.getsitepackages():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["SHEEPDOG_ENGINE_LOGLEVEL"] = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "streaming.engine", address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        # Not in the worker's process group: a Ctrl-C or a group SIGTERM asks the worker for a
        # warm shutdown, and its running streams still need the engine until they end.
        start_new_session=True,
    )
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            if sel.select(deadline - time.monotonic()):
                data = os.read(proc.stdout.fileno(), 64)
                if not data:
                    break
                line += data
    if line != READY:
        proc.kill()
        raise Unavailable(f"the stream engine did not start (exit {proc.wait()})")
    proc.stdout.close()
    log.info("stream engine %d serving", proc.pid)
    return proc, address


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """This process's engine (after a fork: a fresh one, started on first use)."""
    global _engine
    with _engine_lock:
        if _engine is None or _engine.pid != os.getpid():
            _engine = Engine()
        return _engine
