"""Documents' state, derived from their requests, and the export of their summaries."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from documents.files import display_path
from models.status import FINAL, Status
from models.tables import Document, Request, in_utc, utcnow

EXPORT_FIELDS = ("path", "title", "hash", "status", "parts", "error", "summary")
# A pending document with no request this long after its scan was never sent (the scan stopped
# between writing its row and its submit: killed, or the database away for both the submit and
# the mark): it is failed, and the next scan sends it again. Far past any scan's length.
UNSENT_AFTER = timedelta(hours=1)
UNSENT = (
    "its requests were never enqueued (the scan stopped before its submit); the next scan"
    " sends it again"
)


class DocumentView(BaseModel):
    """One document as `sheepdog documents status|export` shows it."""

    id: int
    path: str
    title: str
    hash: str
    status: str  # pending, succeeded, failed, cancelled, refused, error
    parts: int
    done_parts: int
    error: str | None
    summary: str | None


def version_requests(session: Session, docs: Sequence[Document]) -> dict[int, list[Request]]:
    """Each document's requests for its current version (older versions' requests are kept)."""
    by_doc: dict[int, list[Request]] = {d.id: [] for d in docs}
    tags = {d.id: d.content_hash[:16] for d in docs}
    ids = list(by_doc)
    for start in range(0, len(ids), 1000):
        rows = session.scalars(
            select(Request).where(Request.document_id.in_(ids[start : start + 1000]))
        )
        for req in rows:
            meta = req.metadata_ or {}
            if req.document_id is not None and meta.get("document_hash") == tags[req.document_id]:
                by_doc[req.document_id].append(req)
    return by_doc


def derive(
    doc: Document, requests: Iterable[Request], now: datetime
) -> tuple[str, int, str | None, str | None]:
    """(status, parts done, error, summary) of a pending document from its requests. A part sent
    more than once (a retry) counts by its best request."""
    requests = list(requests)
    if not requests and in_utc(doc.scanned_at) + UNSENT_AFTER < now:
        return "failed", 0, UNSENT, None
    best: dict[int, Request] = {}
    rank = {"succeeded": 3, "queued": 2, "batched": 2, "streaming": 2, "failed": 1, "cancelled": 1}
    for req in requests:
        part = req.document_part or 1
        if part not in best or rank.get(req.status, 0) > rank.get(best[part].status, 0):
            best[part] = req
    wanted = range(1, max(doc.parts, 1) + 1)
    done = sum(1 for p in wanted if p in best and best[p].status == Status.SUCCEEDED)
    if done == len(wanted):
        summary = "\n\n".join((best[p].text or "").strip() for p in wanted)
        return "succeeded", done, None, summary
    failed = (Status.FAILED, Status.CANCELLED)
    ended = [best[p] for p in wanted if p in best and best[p].status in failed]
    if ended and all(p in best and best[p].status in FINAL for p in wanted):
        # Only cancelled parts: an operator's choice, which the next scan keeps (a failed
        # document is sent again).
        status = "failed" if any(r.status == Status.FAILED for r in ended) else "cancelled"
        first = next((r for r in ended if r.status == Status.FAILED), ended[0])
        reason = first.error or first.status
        return status, done, f"part {first.document_part or 1}: {reason}", None
    return "pending", done, None, None


def refresh(session: Session) -> list[DocumentView]:
    """Bring pending documents' status and summary up to date from their requests; return every
    document's view."""
    docs = list(session.scalars(select(Document).order_by(Document.path)))
    pending = [d for d in docs if d.status == "pending"]
    now = utcnow()
    requests = version_requests(session, pending) if pending else {}
    done_parts: dict[int, int] = {}
    for doc in pending:
        status, done, error, summary = derive(doc, requests[doc.id], now)
        done_parts[doc.id] = done
        if status != "pending":
            doc.status, doc.error, doc.summary = status, error, summary
    session.flush()
    return [
        DocumentView(
            id=d.id,
            path=display_path(d.path),
            title=d.title,
            hash=d.content_hash,
            status=d.status,
            parts=d.parts,
            done_parts=done_parts.get(d.id, d.parts if d.status == "succeeded" else 0),
            error=d.error,
            summary=d.summary,
        )
        for d in docs
    ]


def counts(views: Iterable[DocumentView]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in views:
        out[v.status] = out.get(v.status, 0) + 1
    return out


def export(views: Sequence[DocumentView], fmt: str) -> str:
    """The documents as JSON lines or CSV (path, title, hash, status, parts, error, summary)."""
    rows: list[dict[str, Any]] = [v.model_dump(include=set(EXPORT_FIELDS)) for v in views]
    if fmt == "jsonl":
        return "".join(json.dumps({k: r[k] for k in EXPORT_FIELDS}) + "\n" for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=EXPORT_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    raise ValueError(f"unknown format {fmt!r}; use jsonl or csv")
