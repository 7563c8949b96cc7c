"""The demo's child processes: each started in its own process group, waited for until its log
says it is ready, and all stopped (the whole group) once, whatever ended the demo."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
SHEEPDOG = [sys.executable, "-m", "sheepdog"]


@dataclass
class Children:
    """The demo's child processes; stop() ends them all (process groups), once."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    stoppers: list[Callable[[], None]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        out = log.open("wb")
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc))

    def get(self, name: str) -> subprocess.Popen[bytes]:
        """The child started as `name`."""
        return next(proc for started, proc in self.procs if started == name)

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        for _, proc in self.procs:  # workers' pool children live in the same groups
            signal_group(proc, signal.SIGKILL)
        self.procs.clear()
        while self.stoppers:
            self.stoppers.pop()()


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the child's process group (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def wait_for_log(log: Path, marker: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once `marker` is in the child's log; raise with the log's tail if it never is."""
    wait_until(
        lambda: log.exists() and marker in log.read_text(errors="replace"), proc, log, timeout
    )


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Return once `ready()`; raise with the child's log tail if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{log.stem} did not start (see {log}):\n{tail}")


def free_port(preferred: int) -> int:
    """`preferred` when it is free on loopback, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


class ChildSpec(NamedTuple):
    """One `sheepdog` child: its name (and log file), arguments, extra environment, the log
    line that says it is ready, and how long it may take to say it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ready: str
    start_s: float = 60.0


def worker_specs(schedule: Path, metrics_port: int) -> list[ChildSpec]:
    """A stream worker (serving /metrics), a batch worker and beat."""
    stream = ["worker", "--queues", "stream", "--concurrency", "50", "--hostname", "demo-stream@%h"]
    batch = ["worker", "--queues", "batch,default", "--concurrency", "4"]
    return [
        # A stream worker says "ready." once each of its processes has its stream engine serving:
        # on a loaded 2-core box two worker processes took ~60 s and their engines 14 s more.
        ChildSpec(
            "stream-worker", stream, {"SHEEPDOG_METRICS_PORT": str(metrics_port)}, "ready.", 120.0
        ),
        ChildSpec("batch-worker", [*batch, "--hostname", "demo-batch@%h"], {}, "ready."),
        ChildSpec("beat", ["beat", "--schedule-file", str(schedule)], {}, "Starting"),
    ]


def start_all(children: Children, specs: list[ChildSpec], env: dict[str, str], logs: Path) -> None:
    """Start every child, then wait for each to be ready (its `start_s`; they start at once)."""
    for spec in specs:
        log = logs / f"{spec.name}.log"
        children.spawn(spec.name, [*SHEEPDOG, *spec.argv], {**env, **spec.env}, log)
    for spec in specs:
        wait_for_log(logs / f"{spec.name}.log", spec.ready, children.get(spec.name), spec.start_s)
