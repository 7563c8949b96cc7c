"""CPU time of processes and of the box, read from /proc (Linux)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """The CPU seconds process `pid` has used (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def box_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        # Every thread's children: a process started from a thread is listed under that thread.
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # a thread or process that has just ended
                todo += [int(c) for c in children.read_text().split()]
    return out


def tree_cpu(pid: int) -> float:
    """The CPU seconds of `pid` and its descendants."""
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):  # a process that has just ended
            total += cpu_s(p)
    return total


class CpuWindow:
    """The CPU some processes use, and the share of the box that is busy, from its creation to
    `read()`."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = [cpu_s(p) for p in pids]
        self.box = box_busy()

    def read(self) -> tuple[list[float], float]:
        """(CPU seconds of each process, busy share of the box's cores) since the start."""
        used = [cpu_s(p) - s for p, s in zip(self.pids, self.start, strict=True)]
        box = box_busy()
        return used, (box[0] - self.box[0]) / max(box[1] - self.box[1], 1.0)


def named(comm: str) -> list[int]:
    """The processes whose command name is `comm` (e.g. `redis-server`, `postgres`)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if stat.read_text().strip() == comm:
                out.append(int(stat.parent.name))
    return out


Groups = dict[str, Callable[[], list[int]]]


class GroupWindow:
    """The CPU seconds each group of processes uses from its creation to `read()`; a group's
    processes are listed again at the read, so one started meanwhile (a new database
    backend) counts from 0."""

    def __init__(self, groups: Groups) -> None:
        self.groups = groups
        self.start = {pid: _cpu_or_0(pid) for find in groups.values() for pid in find()}

    def read(self) -> dict[str, float]:
        return {
            name: sum(_cpu_or_0(pid) - self.start.get(pid, 0.0) for pid in find())
            for name, find in self.groups.items()
        }


def _cpu_or_0(pid: int) -> float:
    try:
        return cpu_s(pid)
    except OSError:  # a process that has just ended
        return 0.0
