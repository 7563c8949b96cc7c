"""Flower on the project's Celery app: basic auth, workers and tasks over its REST API, no
prompts shown."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.server import free_port
from tests.fixtures.ends import assert_ended

ROOT = Path(__file__).resolve().parents[1]
AUTH = "ops:fl0wer-pw-" + uuid.uuid4().hex[:8]
SHEEPDOG = [sys.executable, "-m", "sheepdog"]


def get(url: str, auth: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


@pytest.fixture
def flower(stack, worker, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    log = (tmp_path / "flower.log").open("wb")
    env = {**stack.env, "SHEEPDOG_FLOWER_BASIC_AUTH": AUTH}
    proc = subprocess.Popen(
        [*SHEEPDOG, "flower", "--port", str(port), "--address", "127.0.0.1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if get(f"{base}/api/workers", AUTH)[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("flower did not start:\n" + (tmp_path / "flower.log").read_text())
        time.sleep(0.2)
    yield base, proc
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_flower_shows_workers_and_tasks_without_prompts(flower, stack_client) -> None:
    base, proc = flower
    # Wait until Flower knows the worker (its event receiver is up): tasks sent before that
    # would show up without their names and arguments. Its first answers may be empty.
    deadline = time.monotonic() + 30
    while True:
        status, body = get(base + "/api/workers?refresh=1", AUTH)
        assert status == 200
        if json.loads(body):  # at least the shared worker
            break
        assert time.monotonic() < deadline, "flower never listed a worker"
        time.sleep(0.5)
    # ...and until its event receiver is live: a warm-up task shows up with its name (one sent
    # before the receiver was up never will, so send another each round).
    warm = {
        "model": "sheepdog-mini",
        "messages": [{"role": "user", "content": "warm"}],
        "priority": "high",
    }
    deadline = time.monotonic() + 30
    while True:
        stack_client.submit(warm)
        time.sleep(0.5)
        shown = json.loads(get(base + "/api/tasks", AUTH)[1])
        if any(t.get("name") == "sheepdog.stream" for t in shown.values()):
            break
        assert time.monotonic() < deadline, "flower's event receiver never showed a task"

    secret_prompt = f"confidential-prompt-{uuid.uuid4().hex}"
    rid = stack_client.submit(
        {
            "model": "sheepdog-mini",
            "messages": [{"role": "user", "content": secret_prompt}],
            "priority": "high",
        }
    )
    stack_client.submit(
        {
            "model": "sheepdog-mini",
            "messages": [{"role": "user", "content": secret_prompt + " low"}],
            "priority": "low",
        }
    )
    assert_ended(stack_client.result(rid, wait=60))

    for path in ("/api/workers", "/api/tasks"):
        assert get(base + path)[0] == 401
        assert get(base + path, "ops:wrong")[0] == 401

    deadline = time.monotonic() + 30
    while True:
        status, body = get(base + "/api/tasks", AUTH)
        assert status == 200
        tasks = json.loads(body)
        names = {t.get("name") for t in tasks.values()}
        # A low request has no task of its own (the producer writes its row and a flush takes
        # it from the table): only its prompt's absence is checked.
        if rid in body and "sheepdog.stream" in names:
            break
        assert time.monotonic() < deadline, f"flower never showed the tasks: {body[:2000]}"
        time.sleep(0.5)
    assert all(str(name).startswith("sheepdog.") for name in names if name)
    assert secret_prompt not in body  # argsrepr: ids, priority and model only
    shown = next(t for t in tasks.values() if rid in str(t.get("args")))
    assert "priority=high" in shown["args"] and "sheepdog-mini" in shown["args"]

    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert AUTH.split(":")[1] not in cmdline  # the password is not visible in ps


def test_flower_refuses_to_run_without_auth(stack) -> None:
    env = {k: v for k, v in stack.env.items() if k != "SHEEPDOG_FLOWER_BASIC_AUTH"}
    cases = [
        ([], "SHEEPDOG_FLOWER_BASIC_AUTH"),
        (["--no-auth", "--address", "0.0.0.0"], "loopback"),
    ]
    for args, reason in cases:
        out = subprocess.run(
            [*SHEEPDOG, "flower", "--port", str(free_port()), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0 and reason in out.stderr, out.stderr
