"""Long-running processes and set-up: `worker`, `beat`, `db upgrade`."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from sheepdog.cli.output import edge, fail
from sheepdog.settings import get_settings

POOLS = ("threads", "prefork", "solo", "gevent")


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(beat)
    db = typer.Typer(help="Database schema.", no_args_is_help=True)
    db.command("upgrade")(db_upgrade)
    app.add_typer(db, name="db")


def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated: stream, default, batch.")] = (
        "stream,default,batch"
    ),
    pool: Annotated[str, typer.Option(help="Celery pool: threads (default), prefork, solo.")] = (
        "threads"
    ),
    concurrency: Annotated[
        int | None, typer.Option(help="Slots; default 1000 for stream, 8 otherwise.")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Node name, e.g. stream@host.")] = None,
) -> None:
    """Run a Celery worker on the given queues."""
    from sheepdog.redis_conn import check_redis

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - {"stream", "default", "batch"})
    if unknown or not names:
        fail(f"unknown queue(s) {', '.join(unknown) or '(none)'}; use stream, default, batch")
    if pool not in POOLS:
        fail(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")
    with edge():
        check_redis()
    if concurrency is None:
        concurrency = 1000 if "stream" in names else 8
    from workers.app import app

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


def beat(
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    schedule_file: Annotated[str, typer.Option(help="Where beat keeps its last-run times.")] = (
        os.path.join(os.environ.get("TMPDIR", "/tmp"), "sheepdog-beat-schedule")
    ),
) -> None:
    """Run Celery beat (flush, poll, janitor, nightly documents). Safe to run twice."""
    from sheepdog.redis_conn import check_redis

    with edge():
        check_redis()
    from workers.app import app

    app.start(argv=["beat", f"--loglevel={loglevel}", f"--schedule={schedule_file}"])


def db_upgrade(
    url: Annotated[str | None, typer.Option(help="Database URL (default: settings).")] = None,
) -> None:
    """Apply the Alembic migrations up to the newest."""
    from sheepdog.migrate import upgrade

    with edge():
        upgrade(url)
    typer.echo(f"database at {url or get_settings().database_url} is up to date")
