"""What the bench scripts start and point at: the simulator's set-ups, the environment and
settings of Sheepdog's processes, and the worker and beat processes themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bench.bodies import chat_body
from core.settings import Settings
from sheepdog.client import Client
from simulator.config import SimulatorConfig
from simulator.server import SimulatorProcess

ROOT = Path(__file__).resolve().parent.parent
Proc = subprocess.Popen[bytes]


def redis_db(db: int) -> str:
    """Database `db` on the server of SHEEPDOG_BENCH_REDIS_URL (default: the local one)."""
    url = os.environ.get("SHEEPDOG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    return f"{url.rsplit('/', 1)[0]}/{db}"


def stream_simulator(workdir: Path) -> SimulatorConfig:
    """The streaming benches' simulator: 20 tokens, 20 ms to the first, 5 ms apart."""
    return SimulatorConfig(
        api_key="sk-bench",
        ttft_ms=20,
        chunk_delay_ms=5,
        answer_tokens=(20, 20),
        data_dir=str(workdir / "sim"),
    )


def batch_simulator() -> SimulatorConfig:
    """The batch benches' simulator, at its fastest."""
    return SimulatorConfig(
        api_key="sk-bench",
        time_scale=1_000_000.0,
        batch_window_s=1e9,  # keep the 24 h window from expiring at this time scale
        answer_tokens=(20, 40),
        data_dir=tempfile.mkdtemp(prefix="bench-sim-"),
    )


def worker_env(redis: str, db: str, sim: SimulatorProcess, **extra: str) -> dict[str, str]:
    """This process's environment without its SHEEPDOG_ settings, then Sheepdog pointed at
    `redis`, `db` and the simulator (and `extra`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env.update(
        SHEEPDOG_REDIS_URL=redis,
        SHEEPDOG_DATABASE_URL=db,
        SHEEPDOG_OPENAI_BASE_URL=sim.base_url,
        SHEEPDOG_OPENAI_API_KEY=sim.api_key,
        **extra,
    )
    return env


def sim_settings(redis: str, db: str, sim: SimulatorProcess, **extra: Any) -> Settings:
    """Settings for this process, pointed at `redis`, `db` and the simulator."""
    return Settings().model_copy(
        update={
            "database_url": db,
            "redis_url": redis,
            "openai_base_url": sim.base_url,
            "openai_api_key": SecretStr(sim.api_key),
            **extra,
        }
    )


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> Proc:
    """`cmd` from the repository root, its output into `log`."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def start_celery(
    env: dict[str, str], logdir: Path, name: str, *args: str, app: str = "workers.app"
) -> Proc:
    """`celery -A app ARGS`, logging to logdir/name.log."""
    return spawn([sys.executable, "-m", "celery", "-A", app, *args], env, logdir / f"{name}.log")


def start_worker(
    env: dict[str, str], logdir: Path, name: str, queues: str, pool: str, n: int, *extra: str
) -> Proc:
    """A Celery worker `name@%h` on `queues` (`pool`, concurrency n)."""
    args = ["worker", "-Q", queues, "-P", pool, "-c", str(n), "-n", f"{name}@%h", *extra]
    return start_celery(env, logdir, name, *args)


def start_beat(env: dict[str, str], logdir: Path, name: str = "beat") -> Proc:
    """Celery beat, its schedule file beside its log."""
    return start_celery(env, logdir, name, "beat", "--schedule", str(logdir / f"{name}-schedule"))


def spawn_stream_worker(
    env: dict[str, str], log: Path, hostname: str | None = None, concurrency: int | None = None
) -> Proc:
    """`sheepdog worker --queues stream`, one process (with its stream engine, a child)."""
    cmd = [sys.executable, "-m", "sheepdog", "worker", "--queues", "stream"]
    cmd += ["--loglevel", "WARNING"]
    cmd += ["--concurrency", str(concurrency)] if concurrency else []
    cmd += ["--hostname", hostname] if hostname else []
    return spawn([*cmd, "--processes", "1"], env, log)


def start_stream_worker(
    env: dict[str, str], logdir: Path, index: int = 0, concurrency: int | None = None
) -> Proc:
    """A stream worker, returned once it has answered a request (consuming, loop started,
    connections warm)."""
    log = logdir / f"worker{index}.log"
    proc = spawn_stream_worker(env, log, f"bench{index}@%h", concurrency)
    try:
        client = Client(
            Settings(redis_url=env["SHEEPDOG_REDIS_URL"], database_url=env["SHEEPDOG_DATABASE_URL"])
        )
        rid = client.submit({**chat_body(0, "warm-up"), "priority": "high"})
        client.result(rid, wait=60)
    except BaseException:
        proc.kill()
        raise
    return proc


def stop(procs: list[Proc], timeout_s: float = 20) -> None:
    """Terminate the processes; kill one that has not ended within the timeout."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
