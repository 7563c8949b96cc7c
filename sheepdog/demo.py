"""`sheepdog demo`: the whole system on one machine with only Redis running.

Starts the provider simulator (unless SHEEPDOG_OPENAI_BASE_URL and a key are set), a stream
worker, a batch worker and beat as child processes in their own process groups, runs a mixed
workload (live streams, the nightly documents job, plain low-priority prompts through the batch
path) and prints the cost report. Every child is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SHEEPDOG = [sys.executable, "-m", "sheepdog"]
SIM_KEY = "sk-demo-simulator"
SIM_MODEL = "sheepdog-mini"
PROVIDER_MODEL = "gpt-4.1-mini"

LIVE_PROMPTS = [
    "A customer asks why their invoice doubled this month. Draft a short, friendly reply.",
    "Explain in two sentences what a dead-letter queue is, for a new on-call engineer.",
    "Suggest three names for an internal tool that routes LLM requests by priority.",
]
TICKETS = [
    "Password reset email never arrives for user on the EU cluster.",
    "Export to CSV cuts off summaries after the first line break.",
    "Dashboard shows yesterday's spend as zero between 00:00 and 00:15 UTC.",
    "Mobile app logs users out after the 4.2 update.",
    "Webhook retries hammer the partner endpoint after a 500.",
    "Search returns archived pages above current ones.",
    "Invoice PDF shows the wrong VAT number for Austrian customers.",
    "Batch job stuck in validating for six hours.",
]
console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)


@dataclass
class Children:
    """The demo's child processes; stop() ends them all (process groups), once."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    stoppers: list[Callable[[], None]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        out = log.open("wb")
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc))

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        for _, proc in self.procs:  # workers' pool children live in the same groups
            _signal_group(proc, signal.SIGKILL)
        self.procs.clear()
        while self.stoppers:
            self.stoppers.pop()()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait_for_log(log: Path, marker: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and marker in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{log.stem} did not start (see {log}):\n{tail}")


def redis_db_url(url: str, db: int) -> str:
    """`url` pointing at database `db`."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def _free_port(preferred: int) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


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
    import redis

    from core.settings import Settings
    from models.migrate import upgrade

    base = Settings()
    var = (ROOT / db_path).parent if not db_path.is_absolute() else db_path.parent
    logs = var / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)
    db_file = db_path if db_path.is_absolute() else ROOT / db_path
    docs = docs_dir if docs_dir.is_absolute() else ROOT / docs_dir

    # Services: a Redis DB of the demo's own (flushed), a fresh SQLite file.
    redis_url = redis_db_url(base.redis_url, redis_db)
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=3).flushdb()
    except redis.RedisError as err:
        raise RuntimeError(
            f"Redis is not reachable at {redis_url} ({err}); start redis-server"
        ) from None
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_file}{suffix}").unlink(missing_ok=True)
    database_url = f"sqlite:///{db_file}"
    upgrade(database_url)

    # Provider: a real one when configured, else the simulator.
    external = bool(base.openai_base_url and base.openai_api_key)
    if external:
        base_url, api_key, model = base.openai_base_url or "", base.api_key(), PROVIDER_MODEL
        model = os.environ.get("SHEEPDOG_DEMO_MODEL", model)
        provider = f"provider at {base_url}"
    else:
        from simulator.config import SimulatorConfig
        from simulator.server import SimulatorProcess

        sim = SimulatorProcess(
            SimulatorConfig(
                api_key=SIM_KEY,
                ttft_ms=250,
                chunk_delay_ms=30,
                time_scale=600,
                data_dir=str(var / "demo-simulator"),
            )
        )
        sim.start()
        children.stoppers.append(sim.stop)
        base_url, api_key, model, provider = sim.base_url, SIM_KEY, SIM_MODEL, "simulator"
        provider = f"simulator at {sim.base_url}"

    metrics_port = _free_port(base.metrics_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    env.update(
        {
            "SHEEPDOG_REDIS_URL": redis_url,
            "SHEEPDOG_DATABASE_URL": database_url,
            "SHEEPDOG_OPENAI_BASE_URL": base_url,
            "SHEEPDOG_OPENAI_API_KEY": api_key,
            "SHEEPDOG_BATCH_FLUSH_INTERVAL_S": "1",
            "SHEEPDOG_BATCH_POLL_INTERVAL_S": "0.5",
            "SHEEPDOG_JANITOR_INTERVAL_S": "2",
            "SHEEPDOG_BATCH_WORKDIR": str(var / "demo-batches"),
            "SHEEPDOG_DOCUMENTS_GLOB": f"{docs}/**/*.md|{docs}/**/*.txt",
            "SHEEPDOG_DOCUMENTS_MODEL": model,
            "SHEEPDOG_METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if base.price_table_file:
        env["SHEEPDOG_PRICE_TABLE_FILE"] = base.price_table_file
    schedule = var / "demo-beat-schedule"
    for stale in var.glob("demo-beat-schedule*"):
        stale.unlink()
    specs = [
        (
            "stream-worker",
            ["worker", "--queues", "stream", "--concurrency", "50", "--hostname", "demo-stream@%h"],
            {"SHEEPDOG_METRICS_PORT": str(metrics_port)},
        ),
        (
            "batch-worker",
            [
                "worker",
                "--queues",
                "batch,default",
                "--concurrency",
                "4",
                "--hostname",
                "demo-batch@%h",
            ],
            {},
        ),
        ("beat", ["beat", "--schedule-file", str(schedule)], {}),
    ]
    with console.status("starting the simulator, a stream worker, a batch worker and beat"):
        for name, argv, extra in specs:
            children.spawn(name, [*SHEEPDOG, *argv], {**env, **extra}, logs / f"{name}.log")
        for (name, proc), marker in zip(
            children.procs, ["ready.", "ready.", "Starting"], strict=True
        ):
            _wait_for_log(logs / f"{name}.log", marker, proc, 60)
    from sheepdog.demo_api import start_front_door, stream_through_front_door

    api_url = start_front_door(children, env, logs, _free_port(8080))  # ready by step 1b
    console.print(
        Panel.fit(
            f"[bold]Sheepdog demo[/]  provider: {provider}  model: {model}\n"
            f"database: {db_file}  redis: {redis_url}\n"
            f"stream worker (threads, queue stream), batch worker (queues batch,default), beat\n"
            f"logs: {logs}",
            title="up in %.1f s" % (time.monotonic() - started),
        )
    )

    settings = Settings(
        redis_url=redis_url,
        database_url=database_url,
        openai_base_url=base_url,
        openai_api_key=api_key,
        documents_model=model,  # type: ignore[arg-type]
        documents_glob=env["SHEEPDOG_DOCUMENTS_GLOB"],
        batch_flush_interval_s=1,
        batch_poll_interval_s=0.5,
    )
    from sheepdog.client import Client

    client = Client(settings)
    # The workload's budget starts once every process is up (each start has its own wait):
    # a slow, busy machine's start-up must not eat the time the batch path needs.
    deadline = time.monotonic() + timeout
    all_ids: list[str] = []

    # 1. People waiting: high priority, streamed token by token.
    console.rule("[bold]high priority: streamed live[/]")
    for prompt in LIVE_PROMPTS:
        rid = client.submit(
            {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "priority": "high",
                "metadata": {"tenant": "support"},
                "max_tokens": 120,
            }
        )
        all_ids.append(rid)
        console.print(f"[cyan]> {prompt}[/]")
        _print_stream(client, rid, max(5.0, deadline - time.monotonic()))

    # 1b. The same from any service, over HTTP (sheepdog/demo_api.py).
    console.rule("[bold]from any service: the HTTP front door, with the official openai SDK[/]")
    all_ids.append(stream_through_front_door(children, api_url, logs, model, console))

    # 2. Nobody waiting: the nightly documents job (as beat would send it) and low-priority prompts.
    console.rule("[bold]low priority: the nightly documents job and tickets, via the batch API[/]")
    from documents.files import find_files

    n_docs = len(find_files(settings.documents_glob))
    client.celery.send_task("sheepdog.documents.scan", queue="default")
    ticket_ids = client.submit_many(
        {
            "model": model,
            "priority": "low",
            "metadata": {"tenant": "triage"},
            "max_tokens": 80,
            "messages": [{"role": "user", "content": f"Summarise and tag this ticket: {t}"}],
        }
        for t in TICKETS
    )
    all_ids.extend(ticket_ids)
    doc_ids = _follow_batch(settings, n_docs, ticket_ids, deadline)
    all_ids.extend(doc_ids)

    # 3. What came back, what it cost, where to look next.
    _show_documents(settings)
    ok = _final_check(settings, all_ids)
    _show_metrics(metrics_port)
    _show_costs(env)
    console.print(
        Panel.fit(
            "Flower (tasks, workers, queues):  SHEEPDOG_FLOWER_BASIC_AUTH=admin:secret "
            "sheepdog flower --port 5555\n"
            f"Metrics (each worker):            curl http://127.0.0.1:{base.metrics_port}/metrics\n"
            "Requests:                         sheepdog status  |  sheepdog status ID --json\n"
            "HTTP front door:                  sheepdog keys create --tenant T; sheepdog api\n"
            "Batches / costs / documents:      sheepdog batches | sheepdog costs | "
            "sheepdog documents status\n"
            "Everything at once:               docker-compose up",
            title="where to look next",
        )
    )
    elapsed = time.monotonic() - started
    verdict = (
        "[bold green]all requests succeeded[/]"
        if ok
        else "[bold red]not every request succeeded[/]"
    )
    console.print(f"{verdict} in {elapsed:.1f} s")
    return 0 if ok else 1


def _print_stream(client: Any, rid: str, timeout: float) -> None:
    from streaming.subscriber import Reset

    for piece in client.stream(rid, timeout=timeout):
        if isinstance(piece, Reset) and not piece:
            console.print("\n[yellow](provider retry: the answer restarts)[/]")
            continue
        console.out(piece, end="", highlight=False)
    console.out("")
    view = client.result(rid, wait=10)
    usage = view.usage
    tokens = f"{usage.prompt_tokens} in / {usage.completion_tokens} out" if usage else "no usage"
    latency = ""
    if view.first_token_at and view.created_at:
        latency = (
            f", first token after {(view.first_token_at - view.created_at).total_seconds():.2f} s"
        )
    console.print(f"[dim]{view.status}: {tokens}, ${view.cost_usd or 0}{latency}[/]\n")


def _follow_batch(settings: Any, n_docs: int, ticket_ids: list[str], deadline: float) -> list[str]:
    """Show progress until every low-priority request has ended; returns the documents' ids."""
    from sqlalchemy import func, select

    from core.db import session_scope
    from models.tables import BatchJob, Document, Request

    final = ("succeeded", "failed", "cancelled")
    tickets = set(ticket_ids)
    columns = [
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        scan = progress.add_task("documents scanned", total=n_docs, note="")
        work = progress.add_task("batch requests ended", total=None, note="")
        while time.monotonic() < deadline:
            with session_scope(settings.database_url) as session:
                docs = dict(
                    session.execute(
                        select(Document.status, func.count()).group_by(Document.status)
                    ).all()
                )
                parts = session.scalar(
                    select(func.sum(Document.parts)).where(
                        Document.status.in_(("pending", "succeeded", "failed"))
                    )
                )
                rows = session.execute(
                    select(Request.id, Request.status).where(Request.route == "batch")
                ).all()
                jobs = dict(
                    session.execute(
                        select(BatchJob.status, func.count()).group_by(BatchJob.status)
                    ).all()
                )
            expected = len(tickets) + int(parts or 0)
            done = sum(1 for _, status in rows if status in final)
            states: dict[str, int] = {}
            for _, status in rows:
                states[status] = states.get(status, 0) + 1
            progress.update(scan, completed=sum(docs.values()), note=_counts(docs))
            progress.update(
                work,
                total=expected,
                completed=done,
                note=f"{_counts(states)} | batch jobs: {_counts(jobs) or 'none yet'}",
            )
            if sum(docs.values()) >= n_docs and len(rows) >= expected and done == len(rows):
                return [rid for rid, _ in rows if rid not in tickets]
            time.sleep(0.3)
    raise RuntimeError("the batch requests did not all end before the demo's timeout")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))


def _show_documents(settings: Any) -> None:
    from core.db import session_scope
    from documents.status import refresh

    with session_scope(settings.database_url) as session:
        views = refresh(session)
    table = Table(
        title=f"documents ({len(views)}): sheepdog documents status | export", title_justify="left"
    )
    table.add_column("document", no_wrap=True)
    table.add_column("status")
    table.add_column("summary (first words)", no_wrap=True, overflow="ellipsis")
    for v in views:
        summary = (v.summary or v.error or "").replace("\n", " ")
        table.add_row(v.title[:38], v.status, summary[:50] + ("…" if len(summary) > 50 else ""))
    console.print(table)


def _final_check(settings: Any, ids: list[str]) -> bool:
    from sqlalchemy import func, select

    from core.db import session_scope
    from models.tables import Request

    with session_scope(settings.database_url) as session:
        counts = dict(
            session.execute(select(Request.status, func.count()).group_by(Request.status)).all()
        )
        missing = len(set(ids)) - (
            session.scalar(select(func.count()).where(Request.id.in_(ids))) or 0
        )
    total = sum(counts.values())
    console.print(
        f"requests: {total} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})"
        + (f"; [red]{missing} never recorded[/]" if missing else "")
    )
    return missing == 0 and total > 0 and counts.get("succeeded", 0) == total


def _show_metrics(port: int) -> None:
    """A few lines from the stream worker's live /metrics, before it stops."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError as err:
        console.print(f"[dim]metrics endpoint not reachable: {err}[/]")
        return
    wanted = (
        "sheepdog_requests{",
        "sheepdog_cost_usd_total",
        "sheepdog_time_to_first_token_seconds_count",
    )
    lines = [line for line in text.splitlines() if line.startswith(wanted)]
    console.print(Panel("\n".join(lines[:12]) or "(no samples)", title=f"/metrics on port {port}"))


def _show_costs(env: dict[str, str]) -> None:
    """The cost report (`sheepdog costs`), or a plain summary of the ledger without it."""
    out = subprocess.run(
        [*SHEEPDOG, "costs", "--by", "route"],
        cwd=ROOT,
        env={**env, "COLUMNS": str(console.width)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode == 0 and out.stdout.strip():
        console.print(out.stdout.rstrip())
        return
    from sqlalchemy import func, select

    from core.db import session_scope
    from models.tables import CostEntry

    with session_scope(env["SHEEPDOG_DATABASE_URL"]) as session:
        rows = session.execute(
            select(
                CostEntry.route,
                func.count(),
                func.sum(CostEntry.cost_usd),
                func.sum(CostEntry.standard_cost_usd),
            ).group_by(CostEntry.route)
        ).all()
    table = Table(title="costs by route (ledger)", title_justify="left")
    for col in ("route", "requests", "cost USD", "at standard rate", "saved"):
        table.add_column(col, justify="right")
    for route, n, cost, std in rows:
        table.add_row(
            route,
            str(n),
            f"{float(cost or 0):.6f}",
            f"{float(std or 0):.6f}",
            f"{float((std or 0) - (cost or 0)):.6f}",
        )
    console.print(table)
