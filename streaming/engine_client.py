"""The task's side of the stream engine (streaming/engine.py): start it, hand it streams.

One engine per Celery worker process that runs stream tasks, started with the worker (or on the
first stream in a prefork child) and started again should it die. Each task thread keeps its
own connection to it and waits there for its stream's end, so the thread costs the consumer's
process nothing while the stream runs.
"""

from __future__ import annotations

import logging
import os
import secrets
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from streaming.engine import HEADER, READY, frame, socket_address
from streaming.store import Unavailable

log = logging.getLogger("sheepdog.streaming.engine")

START_TIMEOUT_S = 60.0


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
        self._local = threading.local()

    # -- the process -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine unless it runs; returns once it serves."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            if self._proc is not None:
                log.error("stream engine exited (%s); starting another", self._proc.returncode)
            self._proc, self._address = _spawn()
            self._generation += 1

    def stop(self) -> None:
        """End the engine (its parent's exit ends it too)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
            self._proc = None

    @property
    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- one stream ------------------------------------------------------------------------

    def run(
        self, request_id: str, item: dict[str, Any] | None, *, overlap: bool, started: float
    ) -> str:
        """Have the engine stream `request_id`; how it ended. Raises Unavailable when the
        engine or the database is away (the task sends itself again), EngineError else."""
        ask = frame({"id": request_id, "item": item, "overlap": overlap, "started": started})
        try:
            sock = self._connection()
            sock.sendall(ask)
            answer = orjson.loads(_read(sock, int.from_bytes(_read(sock, HEADER), "big")))
        except OSError as err:
            self._drop_connection()
            raise Unavailable(f"stream engine unreachable: {err!r}") from err
        if "ended" in answer:
            return str(answer["ended"])
        if answer.get("raise") == "unavailable":
            raise Unavailable(str(answer.get("message")))
        raise EngineError(str(answer.get("message")))

    def _connection(self) -> socket.socket:
        local = self._local
        sock: socket.socket | None = getattr(local, "sock", None)
        if sock is not None and local.generation == self._generation:
            return sock
        self._drop_connection()
        self.start()  # a no-op while it runs; another one if it died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(socket_address(self._address))
        except OSError:
            sock.close()
            raise
        local.sock, local.generation = sock, self._generation
        return sock

    def _drop_connection(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close()
            self._local.sock = None


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
    # Found where this process found Sheepdog's packages, whatever the working directory.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["SHEEPDOG_ENGINE_LOGLEVEL"] = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    proc = subprocess.Popen(
        [sys.executable, "-m", "streaming.engine", address],
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
