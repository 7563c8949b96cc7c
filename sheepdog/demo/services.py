"""What the demo runs against: a Redis database of its own (flushed), a fresh SQLite file, a
provider (a real one when configured, else the simulator), and the environment its children
share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from sheepdog.demo.processes import ROOT, Children

if TYPE_CHECKING:
    from core.settings import Settings

SIM_KEY = "sk-demo-simulator"
SIM_MODEL = "sheepdog-mini"
PROVIDER_MODEL = "gpt-4.1-mini"


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo writes: the database file, and beside it the logs and work folders."""

    var: Path
    logs: Path
    db_file: Path
    docs: Path

    @classmethod
    def under_root(cls, db_path: Path, docs_dir: Path) -> DemoPaths:
        """Relative paths are taken from the repository's root."""
        db_file = db_path if db_path.is_absolute() else ROOT / db_path
        docs = docs_dir if docs_dir.is_absolute() else ROOT / docs_dir
        var = db_file.parent
        logs = var / "demo-logs"
        logs.mkdir(parents=True, exist_ok=True)
        return cls(var=var, logs=logs, db_file=db_file, docs=docs)

    def beat_schedule(self) -> Path:
        """Beat's schedule file, without a previous run's leftovers."""
        for stale in self.var.glob("demo-beat-schedule*"):
            stale.unlink()
        return self.var / "demo-beat-schedule"


@dataclass(frozen=True)
class Provider:
    """The provider the workers talk to and the model the workload asks for."""

    base_url: str
    api_key: str
    model: str
    description: str


def redis_db_url(url: str, db: int) -> str:
    """`url` pointing at database `db`."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def fresh_redis(base_url: str, db: int) -> str:
    """The URL of Redis database `db`, flushed; a readable error when Redis is not there."""
    import redis

    url = redis_db_url(base_url, db)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).flushdb()
    except redis.RedisError as err:
        raise RuntimeError(f"Redis is not reachable at {url} ({err}); start redis-server") from None
    return url


def fresh_database(db_file: Path) -> str:
    """A new SQLite database at `db_file`, migrated to head; its URL."""
    from models.migrate import upgrade

    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_file}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{db_file}"
    upgrade(url)
    return url


def start_provider(base: Settings, children: Children, var: Path) -> Provider:
    """The configured provider when there is one (URL and key), else a simulator started now
    (stopped with the children)."""
    if base.openai_base_url and base.openai_api_key:
        model = os.environ.get("SHEEPDOG_DEMO_MODEL", PROVIDER_MODEL)
        url = base.openai_base_url
        return Provider(url, base.api_key(), model, f"provider at {url}")
    from simulator.config import SimulatorConfig
    from simulator.server import SimulatorProcess

    config = SimulatorConfig(
        api_key=SIM_KEY,
        ttft_ms=250,
        chunk_delay_ms=30,
        time_scale=600,
        data_dir=str(var / "demo-simulator"),
    )
    sim = SimulatorProcess(config)
    sim.start()
    children.stoppers.append(sim.stop)
    return Provider(sim.base_url, SIM_KEY, SIM_MODEL, f"simulator at {sim.base_url}")


def child_env(
    base: Settings, redis_url: str, database_url: str, provider: Provider, paths: DemoPaths
) -> dict[str, str]:
    """The children's environment: this one without its SHEEPDOG_ settings, plus the demo's
    (short flush, poll and janitor intervals so the batch path ends in seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env.update(
        {
            "SHEEPDOG_REDIS_URL": redis_url,
            "SHEEPDOG_DATABASE_URL": database_url,
            "SHEEPDOG_OPENAI_BASE_URL": provider.base_url,
            "SHEEPDOG_OPENAI_API_KEY": provider.api_key,
            "SHEEPDOG_BATCH_FLUSH_INTERVAL_S": "1",
            "SHEEPDOG_BATCH_POLL_INTERVAL_S": "0.5",
            "SHEEPDOG_JANITOR_INTERVAL_S": "2",
            "SHEEPDOG_BATCH_WORKDIR": str(paths.var / "demo-batches"),
            "SHEEPDOG_DOCUMENTS_GLOB": f"{paths.docs}/**/*.md|{paths.docs}/**/*.txt",
            "SHEEPDOG_DOCUMENTS_MODEL": provider.model,
            "SHEEPDOG_METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if base.price_table_file:
        env["SHEEPDOG_PRICE_TABLE_FILE"] = base.price_table_file
    return env


def client_settings(env: dict[str, str], provider: Provider) -> Settings:
    """Settings for the demo's own client: the same services as the children."""
    from core.settings import Settings

    return Settings(
        redis_url=env["SHEEPDOG_REDIS_URL"],
        database_url=env["SHEEPDOG_DATABASE_URL"],
        openai_base_url=provider.base_url,
        openai_api_key=provider.api_key,
        documents_model=provider.model,  # type: ignore[arg-type]
        documents_glob=env["SHEEPDOG_DOCUMENTS_GLOB"],
        batch_flush_interval_s=1,
        batch_poll_interval_s=0.5,
    )
