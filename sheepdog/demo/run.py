"""`run_demo`: services up, the children started, the workload run and reported, every child
stopped whatever happens (an error, Ctrl-C, SIGTERM)."""

from __future__ import annotations

import atexit
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sheepdog.demo import report, workload
from sheepdog.demo.console import console
from sheepdog.demo.front_door import start_front_door, stream_through_front_door
from sheepdog.demo.processes import Children, free_port, start_all, worker_specs
from sheepdog.demo.services import (
    DemoPaths,
    Provider,
    child_env,
    client_settings,
    fresh_database,
    fresh_redis,
    start_provider,
)

if TYPE_CHECKING:
    from core.settings import Settings


def run_demo(
    db_path: str = "var/demo.db",
    redis_db: int = 2,
    docs_dir: str = "samples/docs",
    timeout: float = 110.0,
) -> int:
    """Run the demo; 0 when every request ended succeeded."""
    started = time.monotonic()
    children = Children()
    atexit.register(children.stop)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return _run(children, Path(db_path), redis_db, Path(docs_dir), timeout, started)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: stopping the demo's processes[/]")
        return 130
    except Exception as err:  # one readable line, the processes still stopped
        console.print(f"[red]demo failed:[/] {err}")
        return 1
    finally:
        children.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.print(
            f"[dim]all demo processes stopped; wall time {time.monotonic() - started:.1f} s[/]"
        )


def _run(
    children: Children,
    db_path: Path,
    redis_db: int,
    docs_dir: Path,
    timeout: float,
    started: float,
) -> int:
    """Everything up, the workload, the report; 0 when every request succeeded."""
    from core.settings import Settings

    base = Settings()
    paths = DemoPaths.under_root(db_path, docs_dir)
    redis_url = fresh_redis(base.redis_url, redis_db)
    database_url = fresh_database(paths.db_file)
    provider = start_provider(base, children, paths.var)
    env = child_env(base, redis_url, database_url, provider, paths)
    metrics_port = free_port(base.metrics_port)
    specs = worker_specs(paths.beat_schedule(), metrics_port)
    with console.status("starting the simulator, a stream worker, a batch worker and beat"):
        start_all(children, specs, env, paths.logs)
    api_url = start_front_door(children, env, paths.logs, free_port(8080))  # ready by step 1b
    elapsed = time.monotonic() - started
    report.show_started(
        provider.description, provider.model, paths.db_file, redis_url, paths.logs, elapsed
    )
    settings = client_settings(env, provider)
    # The workload's budget starts once every process is up (each start has its own wait):
    # a slow, busy machine's start-up must not eat the time the batch path needs.
    ids = _workload(children, settings, provider, api_url, paths.logs, time.monotonic() + timeout)

    # 3. What came back, what it cost, where to look next.
    report.show_documents(settings)
    ok = report.final_check(settings, ids)
    report.show_metrics(metrics_port)
    report.show_costs(env)
    report.show_where_next(base.metrics_port)
    report.show_verdict(ok, time.monotonic() - started)
    return 0 if ok else 1


def _workload(
    children: Children,
    settings: Settings,
    provider: Provider,
    api_url: str,
    logs: Path,
    deadline: float,
) -> list[str]:
    """The three kinds of traffic, each under its own heading; every request's id."""
    from sheepdog.client import Client

    client = Client(settings)
    model = provider.model

    # 1. People waiting: high priority, streamed token by token.
    console.rule("[bold]high priority: streamed live[/]")
    ids = workload.stream_live(client, model, deadline)

    # 1b. The same from any service, over HTTP (front_door.py).
    console.rule("[bold]from any service: the HTTP front door, with the official openai SDK[/]")
    ids.append(stream_through_front_door(children, api_url, logs, model))

    # 2. Nobody waiting: the nightly documents job (as beat would send it) and low-priority prompts.
    console.rule("[bold]low priority: the nightly documents job and tickets, via the batch API[/]")
    n_docs, ticket_ids = workload.submit_low_priority(client, settings, model)
    ids.extend(ticket_ids)
    ids.extend(workload.follow_batch(settings, n_docs, ticket_ids, deadline))
    return ids
