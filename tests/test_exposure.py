"""Nothing exposed that should not be: the simulator's admin API behind its key (loopback only
without one), its key from the environment, request bodies bounded before they are read; worker
metrics on loopback by default; what Flower shows of an intake task stays ids, priority and
model on every attempt, after an autoretry too."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.config import SimulatorConfig
from simulator.server import SimulatorProcess, free_port
from tests.fixtures.simulator import start_simulator

ROOT = Path(__file__).resolve().parents[1]


def call(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key:
            sent["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def routable_ip() -> str | None:
    """An address of this machine other than loopback (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        ip = str(sock.getsockname()[0])
    return None if ip.startswith("127.") else ip


def test_admin_api_needs_the_key_and_never_shows_it() -> None:
    with start_simulator(api_key="sk-admin-secret") as sim:
        for method, path, body in (
            ("GET", "/_sim/config", None),
            ("PUT", "/_sim/config", b'{"api_key": "sk-mine"}'),
            ("GET", "/_sim/stats", None),
            ("POST", "/_sim/reset", b"{}"),
        ):
            status, _ = call(sim.host, sim.port, method, path, body)
            assert status == 401, (method, path, status)
            status, _ = call(sim.host, sim.port, method, path, body, key="sk-wrong")
            assert status == 401, (method, path, status)
        status, shown = call(sim.host, sim.port, "GET", "/_sim/config", key="sk-admin-secret")
        assert status == 200 and shown["api_key"] == "(set)"
        assert "sk-admin-secret" not in json.dumps(shown)
        # The refused PUT swapped nothing: the old key still works, the "new" one does not.
        assert call(sim.host, sim.port, "GET", "/v1/models", key="sk-admin-secret")[0] == 200
        assert call(sim.host, sim.port, "GET", "/v1/models", key="sk-mine")[0] == 401


def test_keyless_admin_api_answers_loopback_only() -> None:
    ip = routable_ip()
    if ip is None:
        pytest.skip("this machine has no address besides loopback")
    config = SimulatorConfig()
    with SimulatorProcess(config, host="0.0.0.0", port=free_port()) as sim:
        assert call("127.0.0.1", sim.port, "GET", "/_sim/config")[0] == 200
        status, body = call(ip, sim.port, "GET", "/_sim/config")
        assert status == 403 and "loopback" in body["error"]["message"]
        status, _ = call(ip, sim.port, "PUT", "/_sim/config", b'{"api_key": "sk-taken"}')
        assert status == 403
        assert call(ip, sim.port, "GET", "/v1/models")[0] == 200  # the public API still works


def test_the_simulator_key_comes_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "SHEEPDOG_SIMULATOR_API_KEY": "sk-from-env"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sheepdog", "simulator", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _ = call("127.0.0.1", port, "GET", "/v1/models", key="sk-from-env")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "did not start"
                time.sleep(0.1)
        assert status == 200
        assert call("127.0.0.1", port, "GET", "/v1/models")[0] == 401
        assert "sk-from-env" not in " ".join(Path(f"/proc/{proc.pid}/cmdline").read_text())
    finally:
        proc.terminate()
        proc.wait(10)


def test_request_bodies_are_bounded_before_they_are_read() -> None:
    with start_simulator(api_key="sk-body") as sim:
        sim.configure(max_body_bytes=10_000)
        # Declared too large: answered at once, nothing read (only 10 bytes are even sent).
        conn = http.client.HTTPConnection(sim.host, sim.port, timeout=10)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Authorization", "Bearer sk-body")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(300 * 1024 * 1024))
        conn.endheaders()
        conn.send(b'{"model": ')
        resp = conn.getresponse()
        assert resp.status == 413
        assert "limit is 10,000 bytes" in json.loads(resp.read())["error"]["message"]
        conn.close()
        # Chunked (no length declared): cut off once past the limit.
        big = json.dumps(
            {"model": "sheepdog-mini", "messages": [{"role": "user", "content": "x" * 50_000}]}
        ).encode()
        conn = http.client.HTTPConnection(sim.host, sim.port, timeout=10)
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=iter([big[i : i + 4096] for i in range(0, len(big), 4096)]),
                headers={"Authorization": "Bearer sk-body", "Content-Type": "application/json"},
                encode_chunked=True,
            )
            assert conn.getresponse().status == 413
        except (BrokenPipeError, ConnectionResetError):
            # The server answered 413 and closed while chunks were still going out: the client
            # then meets the closed socket before (or instead of) the answer. Cut off either way.
            pass
        conn.close()
        small = {"model": "sheepdog-mini", "messages": [{"role": "user", "content": "hi"}]}
        status, _ = call(
            sim.host,
            sim.port,
            "POST",
            "/v1/chat/completions",
            json.dumps(small).encode(),
            "sk-body",
        )
        assert status == 200


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found


def test_worker_metrics_listen_on_loopback_by_default(stack: Any) -> None:
    from core.settings import Settings

    assert Settings(_env_file=None).metrics_address == "127.0.0.1"  # type: ignore[call-arg]
    port = free_port()
    stack.start_worker(
        queues="default", concurrency=2, env={"SHEEPDOG_METRICS_PORT": str(port)}, name="metrics"
    )
    deadline = time.monotonic() + 30
    while not listening_addresses(port):
        assert time.monotonic() < deadline, "the worker never served metrics"
        time.sleep(0.2)
    assert listening_addresses(port) == {"127.0.0.1"}


@pytest.fixture
def retrying_intake(stack: Any, pg_url: str) -> Iterator[Any]:
    """A client and a worker of a deployment of their own whose worker cannot reach its
    database: every intake message fails with OperationalError and is retried."""
    from core.settings import Settings
    from sheepdog.client import Client

    prefix = f"{stack.env['SHEEPDOG_BROKER_PREFIX']}retry-{uuid.uuid4().hex[:4]}:"
    dead_db = f"postgresql+psycopg://sheepdog@127.0.0.1:{free_port()}/nowhere"
    worker = stack.start_worker(
        queues="default",
        concurrency=2,
        env={"SHEEPDOG_BROKER_PREFIX": prefix, "SHEEPDOG_DATABASE_URL": dead_db},
        name="retrying",
    )
    # The intake message is what an autoretry re-sends: the producer sends one only when it
    # does not write the rows itself (SHEEPDOG_PRODUCER_WRITES_ROWS=0).
    settings = Settings(
        redis_url=stack.env["SHEEPDOG_REDIS_URL"],
        broker_prefix=prefix,
        database_url=pg_url,
        producer_writes_rows=False,
    )
    yield Client(settings)
    worker.stop()


def test_flower_shows_ids_only_after_an_autoretry(retrying_intake: Any) -> None:
    """The worker's task events (what Flower shows) of every attempt carry the producer's
    argsrepr, not the request."""
    client = retrying_intake
    app = client.celery
    received: list[dict[str, Any]] = []
    secret = f"the prompt {uuid.uuid4().hex}"
    ready = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"task-received": received.append})
            ready.set()
            for _ in recv.itercapture(limit=None, timeout=None, wakeup=False):
                if stop.is_set() or len(received) >= 3:
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert ready.wait(10)
    time.sleep(0.5)  # the receiver's queue is bound
    rid = client.submit(
        {
            "model": "sheepdog-mini",
            "messages": [{"role": "user", "content": secret}],
            "priority": "low",
            "metadata": {"tenant": "t-retry"},
        }
    )
    listener.join(45)
    stop.set()
    attempts = [e for e in received if e.get("name") == "sheepdog.intake"]
    assert len(attempts) >= 2, f"no retry seen: {received}"
    for event in attempts:
        assert event["args"] == f"[1 requests: {rid}..{rid}]", event
        shown = json.dumps(event)
        assert secret not in shown and "messages" not in shown and "t-retry" not in shown
