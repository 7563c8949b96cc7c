"""Long-running processes and set-up: `worker`, `beat`, `db upgrade`."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from core.settings import get_settings
from sheepdog.cli.output import edge, fail

POOLS = ("threads", "prefork", "solo", "gevent")


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(beat)
    db = typer.Typer(help="Database schema.", no_args_is_help=True)
    db.command("upgrade")(db_upgrade)
    app.add_typer(db, name="db")


def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated: stream, default, batch, webhooks.")
    ] = "stream,default,batch,webhooks",
    pool: Annotated[str, typer.Option(help="Celery pool: threads (default), prefork, solo.")] = (
        "threads"
    ),
    concurrency: Annotated[
        int | None, typer.Option(help="Slots; default 1000 for stream, 8 otherwise.")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Node name, e.g. stream@host.")] = None,
    processes: Annotated[
        int,
        typer.Option(
            help="Worker processes, each with its own slots; 0: one per core for a stream-only "
            "threads worker, else 1."
        ),
    ] = 0,
) -> None:
    """Run a Celery worker on the given queues."""
    from core.redis_conn import check_redis

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - {"stream", "default", "batch", "webhooks"})
    if unknown or not names:
        fail(
            f"unknown queue(s) {', '.join(unknown) or '(none)'}; "
            "use stream, default, batch, webhooks"
        )
    if pool not in POOLS:
        fail(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")
    with edge():
        check_redis()
    if concurrency is None:
        concurrency = 1000 if "stream" in names else 8
    if processes <= 0:
        processes = _cores() if names == ["stream"] and pool == "threads" else 1
    if processes > 1:
        from sheepdog.cli.supervise import run_processes

        base = [sys.executable, "-m", "sheepdog", "worker", f"--queues={','.join(names)}"]
        base += [f"--pool={pool}", f"--concurrency={concurrency}", f"--loglevel={loglevel}"]
        name, _, host = (hostname or "celery@%h").partition("@")
        commands = [
            [*base, f"--hostname={name}-{i}@{host or '%h'}", "--processes=1"]
            for i in range(1, processes + 1)
        ]
        raise typer.Exit(run_processes(commands))
    from workers.app import worker_app

    app = worker_app()

    argv = [
        "worker",
        f"--queues={','.join(names)}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        "--events",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    app.worker_main(argv=argv)


def _cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def beat(
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    schedule_file: Annotated[str, typer.Option(help="Where beat keeps its last-run times.")] = (
        os.path.join(os.environ.get("TMPDIR", "/tmp"), "sheepdog-beat-schedule")
    ),
) -> None:
    """Run Celery beat (flush, poll, janitor, nightly documents). Safe to run twice."""
    from core.redis_conn import check_redis

    with edge():
        check_redis()
    from workers.app import worker_app

    app = worker_app()

    app.start(argv=["beat", f"--loglevel={loglevel}", f"--schedule={schedule_file}"])


def db_upgrade(
    url: Annotated[str | None, typer.Option(help="Database URL (default: settings).")] = None,
) -> None:
    """Apply the Alembic migrations up to the newest."""
    from models.migrate import upgrade

    with edge():
        upgrade(url)
    typer.echo(f"database at {url or get_settings().database_url} is up to date")
