"""`sheepdog worker --processes N`: N worker processes on one host, started and stopped as one.

A stream worker process runs its streams in its stream engine (one asyncio loop in a child
process), and a process runs Python on one core at a time (the GIL): on a host with more cores,
one worker (and engine) per core relays more chunks. The
children are ordinary `sheepdog worker` processes with their own node names. A signal to the
parent (TERM, INT, QUIT, HUP) goes to every child; when one child exits, the others are told to
stop too, so whatever supervises the parent (systemd, Docker) sees the whole unit stop and
restarts it. A parent killed outright takes its children with it (PR_SET_PDEATHSIG), so
`kill -9` of the worker means what it means for one process: its streams stop, and the
janitor hands them to another worker. Metrics: every child writes to one multiprocess directory
and the first serves /metrics for them all (as a prefork parent does for its children).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from types import FrameType

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the children outlive a killed parent
        pass


def _metrics_dir() -> tuple[str, bool]:
    """The children's shared metrics directory (SHEEPDOG's own, wiped, or a fresh one) and
    whether this process made it."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return tempfile.mkdtemp(prefix="sheepdog-metrics-"), True
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        with contextlib.suppress(OSError):
            os.remove(stale)
    return path, False


def run_processes(commands: list[list[str]]) -> int:
    """Run the commands as children until they have all exited; the first non-zero code."""
    path, made = _metrics_dir()
    try:
        return _run(commands, path)
    finally:
        if made:
            shutil.rmtree(path, ignore_errors=True)


def _run(commands: list[list[str]], metrics_dir: str) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    quiet = {**env, "SHEEPDOG_METRICS_PORT": "0"}  # the first child serves the port
    # preexec_fn is safe here: this process has started no thread.
    children = [
        subprocess.Popen(cmd, env=env if i == 0 else quiet, preexec_fn=_die_with_parent)
        for i, cmd in enumerate(commands)
    ]
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    code = 0
    while True:
        running = [child for child in children if child.poll() is None]
        for child in children:
            if child.returncode not in (None, 0) and code == 0:
                code = child.returncode
        if not running:
            return code
        if len(running) < len(children) and not stopping:
            stopping = True  # one exited: the unit stops as a whole
            for child in running:
                child.send_signal(signal.SIGTERM)
        time.sleep(0.2)
