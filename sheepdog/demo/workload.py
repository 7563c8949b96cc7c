"""The demo's workload: people waiting (high priority, streamed live) and nobody waiting (the
nightly documents job and low-priority tickets, through the batch path), followed to the end."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sheepdog.demo.console import console

if TYPE_CHECKING:
    from core.settings import Settings
    from sheepdog.client import Client

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
FINAL = ("succeeded", "failed", "cancelled")


def stream_live(client: Client, model: str, deadline: float) -> list[str]:
    """Submit each live prompt at high priority and print its answer as it streams; the ids."""
    ids = []
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
        ids.append(rid)
        console.print(f"[cyan]> {prompt}[/]")
        print_stream(client, rid, max(5.0, deadline - time.monotonic()))
    return ids


def print_stream(client: Client, rid: str, timeout: float) -> None:
    """Print one request's answer piece by piece, then its usage, cost and first-token time."""
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


def submit_low_priority(client: Client, settings: Settings, model: str) -> tuple[int, list[str]]:
    """Send the documents job (as beat would) and the tickets at low priority; (the number of
    documents it will scan, the tickets' ids)."""
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
    return n_docs, ticket_ids


@dataclass(frozen=True)
class BatchSnapshot:
    """The batch path's progress at one moment, read from the database."""

    docs: dict[str, int]  # documents by status
    parts: int  # requests the scanned documents make
    rows: list[tuple[str, str]]  # (id, status) of every batch-route request
    jobs: dict[str, int]  # batch jobs by status

    @classmethod
    def read(cls, database_url: str) -> BatchSnapshot:
        from sqlalchemy import func, select

        from core.db import session_scope
        from models.tables import BatchJob, Document, Request

        by_status = select(Document.status, func.count()).group_by(Document.status)
        scanned_parts = select(func.sum(Document.parts)).where(
            Document.status.in_(("pending", "succeeded", "failed", "cancelled"))
        )
        batch_rows = select(Request.id, Request.status).where(Request.route == "batch")
        job_states = select(BatchJob.status, func.count()).group_by(BatchJob.status)
        with session_scope(database_url) as session:
            docs = dict(session.execute(by_status).tuples().all())
            parts = session.scalar(scanned_parts)
            rows = list(session.execute(batch_rows).tuples().all())
            jobs = dict(session.execute(job_states).tuples().all())
        return cls(docs, int(parts or 0), rows, jobs)

    def ended(self) -> int:
        return sum(1 for _, status in self.rows if status in FINAL)

    def by_status(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for _, status in self.rows:
            states[status] = states.get(status, 0) + 1
        return states


def follow_batch(
    settings: Settings, n_docs: int, ticket_ids: list[str], deadline: float
) -> list[str]:
    """Show progress until every low-priority request has ended; returns the documents' ids."""
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
            now = BatchSnapshot.read(settings.database_url)
            expected = len(tickets) + now.parts
            scanned = sum(now.docs.values())
            progress.update(scan, completed=scanned, note=_counts(now.docs))
            jobs = _counts(now.jobs) or "none yet"
            note = f"{_counts(now.by_status())} | batch jobs: {jobs}"
            progress.update(work, total=expected, completed=now.ended(), note=note)
            if scanned >= n_docs and len(now.rows) >= expected and now.ended() == len(now.rows):
                return [rid for rid, _ in now.rows if rid not in tickets]
            time.sleep(0.3)
    raise RuntimeError("the batch requests did not all end before the demo's timeout")


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
