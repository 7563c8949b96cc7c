"""Serving the simulator: ``run`` (blocking, uvicorn) and ``SimulatorProcess`` (a subprocess)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from simulator.config import FaultRule, SimulatorConfig


def run(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 8099) -> None:
    """Serve the simulator until interrupted (uvloop + httptools when available)."""
    import uvicorn

    from simulator.app import create_app

    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        loop="auto",
        http="auto",
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=30,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class SimulatorProcess:
    """The simulator in a subprocess (``python -m simulator``), for tests and the demo.

    ``with SimulatorProcess(SimulatorConfig(api_key="sk-x")) as sim: sim.base_url`` — waits until
    ``/v1/models`` answers, stops the process on exit.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 20.0,
        quiet: bool = True,
    ) -> None:
        self.config = config or SimulatorConfig()
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self.quiet = quiet
        self.process: subprocess.Popen[bytes] | None = None
        self._config_file: Path | None = None

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:8099``."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url`` (ends in ``/v1``)."""
        return f"{self.url}/v1"

    @property
    def api_key(self) -> str:
        """The key clients must send (any key works when none is configured)."""
        return self.config.api_key or "sk-simulator"

    def start(self) -> SimulatorProcess:
        """Start the subprocess and wait until it answers."""
        self.config.resolved_data_dir()
        handle, name = tempfile.mkstemp(prefix="sheepdog-sim-", suffix=".json")
        with os.fdopen(handle, "w") as out:
            out.write(self.config.model_dump_json())
        self._config_file = Path(name)
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        command = [
            sys.executable,
            "-m",
            "simulator",
            "--config",
            name,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        sink = subprocess.DEVNULL if self.quiet else None
        self.process = subprocess.Popen(command, env=env, stdout=sink, stderr=sink)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"simulator exited with code {self.process.returncode}")
            try:
                self._request("GET", "/v1/models")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"simulator on port {self.port} did not start")

    def stop(self) -> None:
        """Stop the subprocess (terminate, then kill)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if self._config_file is not None:
            self._config_file.unlink(missing_ok=True)
            self._config_file = None

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Admin API -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def set_faults(self, rules: list[FaultRule | dict[str, Any]]) -> None:
        """Replace the fault rules (counters restart)."""
        self.configure(faults=rules)

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change runtime settings (``PUT /_sim/config``); returns the configuration in force."""
        if "faults" in changes:
            changes["faults"] = [
                r.model_dump(exclude_none=True) if isinstance(r, FaultRule) else r
                for r in changes["faults"]
            ]
        result: dict[str, Any] = self._request("PUT", "/_sim/config", changes)
        return result

    def stats(self) -> dict[str, Any]:
        """Counters and the chat-request arrival log (``GET /_sim/stats``)."""
        result: dict[str, Any] = self._request("GET", "/_sim/stats")
        return result

    def reset(self) -> None:
        """Startup configuration, fresh counters (``POST /_sim/reset``)."""
        self._request("POST", "/_sim/reset", {})
