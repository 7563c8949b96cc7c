"""The documents job end to end: scan -> intake -> batch flush -> simulator batch -> ingest ->
the document's status and summary, through a real worker and beat on PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sqlalchemy import select

from core.db import session_scope
from documents.scan import scan_documents
from documents.status import DocumentView, export, refresh
from models.tables import Request
from tests.fixtures.ends import assert_ended


def _wait_documents(settings, root: Path, want: int, timeout: float = 60) -> list[DocumentView]:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(settings.database_url) as session:
            views = [v for v in refresh(session) if v.path.startswith(str(root))]
        if len(views) == want and all(v.status != "pending" for v in views):
            return views
        assert time.monotonic() < deadline, f"documents still pending: {views}"
        time.sleep(0.5)


def test_documents_summarised_through_the_batch_path(stack, worker, stack_client, tmp_path):
    beat = stack.start_beat(name="beat-docs")
    try:
        (tmp_path / "one.md").write_text("# Runbook one\n\nRestart the broker, then drain.\n")
        (tmp_path / "two.txt").write_text("Meeting two\n\nWe chose the batch path for reports.\n")
        settings = stack_client.settings.model_copy(
            update={"documents_glob": f"{tmp_path}/*.md|{tmp_path}/*.txt"}
        )
        report = scan_documents(settings, client=stack_client)
        assert (report.new, report.requests, report.error) == (2, 2, None)

        views = _wait_documents(settings, tmp_path, 2)
        assert {v.status for v in views} == {"succeeded"}, views
        assert all(v.summary for v in views)
        with session_scope(settings.database_url) as session:
            linked = session.scalars(
                select(Request).where(Request.document_id.in_([v.id for v in views]))
            ).all()
            assert {r.route for r in linked} == {"batch"} and len(linked) == 2
            assert all(r.tenant == "documents" and r.document_part == 1 for r in linked)
        rows = [json.loads(line) for line in export(views, "jsonl").splitlines()]
        assert {r["title"] for r in rows} == {"Runbook one", "Meeting two"}
        first_summary = {r["title"]: r["summary"] for r in rows}

        # Changed: sent again and summarised anew; unchanged: left alone.
        (tmp_path / "two.txt").write_text("Meeting two\n\nWe moved the reports back to Monday.\n")
        again = scan_documents(settings, client=stack_client)
        assert (again.changed, again.unchanged, again.requests) == (1, 1, 1)
        views = _wait_documents(settings, tmp_path, 2)
        by_title = {v.title: v for v in views}
        assert_ended(by_title["Meeting two"])
        assert by_title["Meeting two"].summary != first_summary["Meeting two"]
        assert by_title["Runbook one"].summary == first_summary["Runbook one"]
    finally:
        beat.stop()
