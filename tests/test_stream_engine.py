"""The stream engine (streaming/engine.py): the process of its own that runs a worker's streams.
Killed mid-stream, the worker starts another and every request still ends, garbled for no
follower; a SIGKILLed worker leaves no engine behind; the engine ignores SIGTERM (a warm
shutdown's streams need it) and serves only its own worker. Real worker and beat processes, a
redis-server and a PostgreSQL database of this module's own, the simulator."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from bench.cpu import process_tree
from core import keys
from streaming.engine_wire import error_answer, frame, socket_address
from tests.fixtures.faults import Deployment, Figures, load_rows, tally, wait_final, wait_for
from tests.fixtures.invariants import check_invariants

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


def request(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "sheepdog-mini",
        "messages": [{"role": "user", "content": text}],
        "priority": "high",
        "max_tokens": 30,
        **extra,
    }


def engine_of(worker: Any, timeout: float = 30) -> tuple[int, str]:
    """(pid, address) of the worker's stream engine, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in process_tree(worker.popen.pid)[1:]:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"streaming.engine" in argv:
                return pid, argv[argv.index(b"streaming.engine") + 1].decode()
        time.sleep(0.1)
    raise AssertionError(f"no stream engine under worker {worker.popen.pid}")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (ended, not yet reaped) has no cmdline left.
    return not Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.mark.unit
def test_what_the_task_raises_for_an_engine_error() -> None:
    # The database or Redis away: the task sends itself again (its message may be the only copy).
    assert error_answer(RedisConnectionError("gone"))["raise"] == "unavailable"
    assert (
        error_answer(OperationalError("SELECT 1", {}, Exception("down")))["raise"] == "unavailable"
    )
    # Anything else fails the task with what went wrong.
    assert error_answer(ValueError("bad"))["raise"] == "error"
    # An integer orjson cannot write still travels, unchanged.
    big = 10**30
    assert json.loads(frame({"n": big})[4:]) == {"n": big}


def test_engine_killed_mid_stream(
    fault_deployment: Deployment, simulator: Any, fault_figures: Figures
) -> None:
    """SIGKILL the engine with 20 streams in flight: the worker starts another; the janitor
    gives the cut streams back to it; every request succeeds and no follower sees a text that
    differs from the row's."""
    dep = fault_deployment
    settings = dep.settings
    tag = f"engine-kill {uuid.uuid4().hex}"
    simulator.set_faults([{"match": tag, "chunk_delay_ms": 100}])
    worker = dep.stream_worker("engine-kill")
    beat = dep.stack.start_beat(name="engine-kill-beat")
    client = dep.client()
    r = redis.Redis.from_url(settings.redis_url)
    try:
        pid, _ = engine_of(worker)
        ids = client.submit_many([request(f"{tag} #{i}") for i in range(20)])

        def shown() -> int:
            with r.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.exists(keys.of(settings).replay_log(rid))
                return sum(pipe.execute())

        wait_for(lambda: shown() == len(ids), 60, "20 streams showing text")
        os.kill(pid, signal.SIGKILL)
        rows = wait_final(settings, ids, 120)
        followers: dict[str, str] = {}
        for rid in ids:
            stream = client.stream(rid, timeout=20)
            for _ in stream:
                pass
            followers[rid] = stream.text  # type: ignore[attr-defined]
        after = client.submit_many([request(f"{tag} after {i}") for i in range(5)])
        wait_final(settings, after, 60)
        assert worker.alive()
        assert engine_of(worker)[0] != pid
    finally:
        simulator.set_faults([])
        beat.stop()
        worker.stop()
    t = tally(settings, ids + after)
    checked = check_invariants(settings, ids + after, followers)
    fault_figures.record(
        "stream engine SIGKILLed under 20 streams",
        t,
        "20 streams in flight; the worker started another engine, the janitor re-sent them",
        garbled=checked.garbled,
    )
    assert t.lost == 0 and t.succeeded == len(ids) + len(after), t
    assert all(rows[rid].attempts >= 1 for rid in ids)


def test_a_killed_worker_leaves_no_engine(fault_deployment: Deployment) -> None:
    worker = fault_deployment.stream_worker("no-orphan")
    pid, _ = engine_of(worker)
    worker.kill()
    wait_for(lambda: gone(pid), 10, "the engine to leave with its worker")


def test_engine_ignores_sigterm_and_serves_only_its_worker(
    fault_deployment: Deployment, simulator: Any
) -> None:
    dep = fault_deployment
    settings = dep.settings
    worker = dep.stream_worker("own-only")
    client = dep.client()
    try:
        pid, address = engine_of(worker)
        os.kill(pid, signal.SIGTERM)  # the worker's to act on, not the engine's
        stranger = f"req_{uuid.uuid4().hex}"
        item = client.prepare(request("from a stranger")).model_dump(mode="json")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(socket_address(address))
            # The engine may close the connection before the ask is even written.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(frame({"id": stranger, "item": item, "overlap": True}))
            try:
                reply = sock.recv(64)
            except ConnectionResetError:
                reply = b""
            assert reply == b""  # closed without an answer
        rid = client.submit(request("from its worker"))
        rows = wait_final(settings, [rid], 60)
        assert rows[rid].status == "succeeded", rows[rid].error
        assert not gone(pid)
        assert not load_rows(settings, [stranger])  # nothing recorded for the stranger
    finally:
        worker.stop()
