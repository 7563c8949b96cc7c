"""`sheepdog demo` end to end as a subprocess: simulator, workers and beat started and stopped,
every request succeeded, nothing left running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures.services import redis_db

ROOT = Path(__file__).resolve().parents[1]
DEMO_REDIS_DB = "1"  # the demo flushes its Redis DB: one no other test uses (fixtures/services.py)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHEEPDOG_", "OPENAI_"))}
    env["SHEEPDOG_REDIS_URL"] = redis_db(0)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sheepdog",
            "demo",
            "--db",
            str(tmp_path / "demo.db"),
            "--redis-db",
            DEMO_REDIS_DB,
            "--timeout",
            "80",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # start-up (all at once, up to 120 s on a busy box) + the workload's 80 s
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    assert "all requests succeeded" in text
    assert "high priority: streamed live" in text and "saved" in text
    assert "the HTTP front door" in text and "response id = request id req_" in text
    assert "succeeded" in text and "Runbook: Redis memory alert" in text
    assert "all demo processes stopped" in text
    assert not _processes_mentioning(str(tmp_path)), "demo left processes running"
    assert not _processes_mentioning("demo-stream@"), "demo left a worker running"
