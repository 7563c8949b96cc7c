"""The nightly scan: each new or changed document becomes low-priority requests (one per part).

Safe to run twice at once (beat may double-fire): a document version's requests carry
idempotency keys made from the document id, its hash and the part, so a second scan enqueues
nothing new.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from core import keys
from core.db import session_scope
from core.errors import BudgetExceeded, InvalidRequest
from core.settings import Settings, get_settings
from documents.files import SourceDocument, find_files, read_document, shown, unfit_file
from documents.split import part_budget, split_text
from lifecycle.record import TRANSIENT
from models.status import FINAL
from models.tables import DOCUMENTS_TENANT, Document, in_utc, utcnow
from rules.prices import PriceTable
from rules.tokens import count_tokens

log = logging.getLogger("sheepdog.documents")

TENANT = DOCUMENTS_TENANT
LOCK_TTL_S = 600
LOCK_RENEW_S = LOCK_TTL_S / 3  # the lock is renewed this often while a scan runs
HASH_TAG = 16  # hex digits of the content hash carried in request metadata and keys


@dataclass
class Planned:
    """A document version to send: its parts, ready once the row has an id."""

    source: SourceDocument
    parts: list[str]
    row_id: int | None = None
    retry: int = 0
    item: dict[str, Any] | None = None  # its line in the scan's report
    done: frozenset[int] = frozenset()  # parts this version has answered already: not sent


@dataclass
class ScanReport:
    """What one scan did, per document and in total."""

    found: int = 0
    new: int = 0
    changed: int = 0
    retried: int = 0
    unchanged: int = 0
    refused: int = 0
    requests: int = 0
    error: str | None = None
    skipped: bool = False
    items: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "items"} | {"items": self.items}


def document_request(
    settings: Settings,
    prices: PriceTable,
    title: str,
    text: str,
    row_id: int,
    content_hash: str,
    part: int,
    parts: int,
    retry: int = 0,
) -> dict[str, Any]:
    """The producer request for one part of one document version."""
    label = title if parts == 1 else f"{title} (part {part} of {parts})"
    price = prices.get(settings.documents_model)
    tag = content_hash[:HASH_TAG]
    key = f"document:{row_id}:{tag}:{part}" + (f":r{retry}" if retry else "")
    return {
        "model": settings.documents_model,
        "messages": [
            {"role": "user", "content": settings.documents_prompt.format(title=label, text=text)}
        ],
        "priority": "low",
        "max_tokens": min(settings.documents_max_tokens, price.max_output_tokens),
        "metadata": {
            "tenant": TENANT,
            "document_id": str(row_id),
            "document_part": str(part),
            "document_hash": tag,
        },
        "idempotency_key": key,
    }


def plan_parts(source: SourceDocument, settings: Settings, prices: PriceTable) -> list[str]:
    """The document's text cut to fit the model; InvalidRequest with the reason to refuse it."""
    if source.refused is not None:
        raise InvalidRequest(source.refused)
    if source.text is None:
        raise InvalidRequest("not UTF-8 text")
    if not source.text.strip():
        raise InvalidRequest("empty document")
    price = prices.get(settings.documents_model)
    answer = min(settings.documents_max_tokens, price.max_output_tokens)
    budget = part_budget(price.context_window, answer, settings.documents_prompt, source.title)
    if budget < 50:
        raise InvalidRequest(
            f"{settings.documents_model}'s context window of {price.context_window} tokens leaves"
            " no room for document text"
        )
    tokens = count_tokens(source.text)
    limit = settings.documents_max_parts
    if math.ceil(tokens / budget) > limit:
        raise InvalidRequest(_too_long(tokens, math.ceil(tokens / budget), limit, settings))
    parts = split_text(source.text, budget)
    if len(parts) > limit:
        raise InvalidRequest(_too_long(tokens, len(parts), limit, settings))
    return parts


def _too_long(tokens: int, parts: int, limit: int, settings: Settings) -> str:
    return (
        f"about {tokens:,} tokens: needs {parts} parts for {settings.documents_model}, over the"
        f" limit of {limit} (SHEEPDOG_DOCUMENTS_MAX_PARTS)"
    )


def scan_documents(
    settings: Settings | None = None,
    *,
    patterns: str | None = None,
    root: Path | None = None,
    client: Any = None,
) -> ScanReport:
    """Scan the documents glob and enqueue one low-priority request per part of each new or
    changed document (and of each whose previous version failed). Returns what it did.

    One scan runs at a time (a Redis lock); a second one returns at once with `skipped`."""
    from core.redis_conn import get_redis

    settings = settings or get_settings()
    lock = get_redis(settings.redis_url).lock(keys.of(settings).documents_lock, timeout=LOCK_TTL_S)
    if not lock.acquire(blocking=False):
        return ScanReport(skipped=True, error="another documents scan is running")
    try:
        return _scan(settings, patterns, root, client, ScanLease(lock))
    except redis.exceptions.LockError:
        log.error("documents scan: stopped, its lock expired (another scan may be running)")
        return ScanReport(error="the scan's lock expired before it ended; nothing of it was sent")
    finally:
        with contextlib.suppress(redis.RedisError):
            lock.release()


class ScanLease:
    """The scan's lock, renewed as the scan goes: a scan of many files outlives one TTL, and a
    second scan must not start beside it. A lock found taken by another raises `LockError`."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self._renewed = time.monotonic()

    def renew(self, *, now: bool = False) -> None:
        """Renew the lock if LOCK_RENEW_S has passed since the last time (or `now`)."""
        at = time.monotonic()
        if now or at - self._renewed >= LOCK_RENEW_S:
            self._lock.reacquire()  # resets the TTL; raises LockNotOwnedError if lost
            self._renewed = at


def _scan(
    settings: Settings, patterns: str | None, root: Path | None, client: Any, lease: ScanLease
) -> ScanReport:
    from documents.status import refresh
    from intake.submit import Submitter

    # Rows written whatever producers do: a row says a part was sent (documents/status.py).
    client = client or Submitter(settings.model_copy(update={"producer_writes_rows": True}))
    prices: PriceTable = client.prices
    prices.get(settings.documents_model)  # unknown model: fail the scan with the reason
    report = ScanReport()
    paths = find_files(patterns or settings.documents_glob, root)
    report.found = len(paths)
    url = settings.database_url

    with session_scope(url) as session:
        refresh(session)  # so a document whose requests all failed is seen as failed
        known = {d.path: d for d in session.scalars(select(Document))}
        planned: list[Planned] = []
        max_bytes = _max_bytes(settings, prices)
        for path in paths:
            lease.renew()
            # One file's trouble is that file's: its row's write in a savepoint of its own.
            try:
                reason = unfit_file(path)
                if reason is None:
                    with session.begin_nested():
                        source = read_document(path, max_bytes)
                        _examine(session, source, known, settings, prices, client, report, planned)
            except TRANSIENT:
                raise  # the database away: the scan's, not this file's
            except (OSError, SQLAlchemyError, ValueError) as err:
                reason = f"{type(err).__name__}: {err}"[:500]
            if reason is not None:
                report.items.append({"path": shown(path), "action": "error", "reason": reason})
                log.warning("documents scan: %s: %s", shown(path), reason)
        lease.renew(now=True)  # still ours before the rows commit, and a full TTL for the send

    # Committed before their requests exist: each request's row links to its document's.
    sends = [(p, _requests_of(p, settings, prices)) for p in planned]
    requests = [r for _, rs in sends for r in rs]
    if requests:
        try:
            client.submit_many(requests)
        except (BudgetExceeded, InvalidRequest):
            # Some document's requests were refused (a budget, an idempotency conflict): all or
            # nothing is per document then, so the others go tonight and not one refusal's
            # backlog every night.
            requests = _submit_each(client, sends, url, report)
        except Exception as err:
            _mark_unsent([p.row_id for p in planned if p.row_id], str(err), url)
            report.error = f"could not enqueue the documents' requests: {err}"
            log.error("documents scan: %s", report.error)
            return report
    report.requests = len(requests)
    log.info(
        "documents scan: %d found, %d new, %d changed, %d unchanged, %d refused, %d requests",
        report.found,
        report.new,
        report.changed,
        report.unchanged,
        report.refused,
        len(requests),
    )
    return report


def _requests_of(p: Planned, settings: Settings, prices: PriceTable) -> list[dict[str, Any]]:
    """The producer requests of one planned document, a part each."""
    return [
        document_request(
            settings,
            prices,
            p.source.title,
            text,
            p.row_id or 0,
            p.source.content_hash,
            i,
            len(p.parts),
            p.retry,
        )
        for i, text in enumerate(p.parts, start=1)
        if i not in p.done
    ]


def _submit_each(
    client: Any, sends: list[tuple[Planned, list[dict[str, Any]]]], url: str, report: ScanReport
) -> list[dict[str, Any]]:
    """Submit each document's requests on their own; a refused document is marked for the next
    scan with its reason (its report item too). Returns the requests sent; any other error
    stops the rest, as it stops a whole submit."""
    sent: list[dict[str, Any]] = []
    for index, (p, requests) in enumerate(sends):
        try:
            client.submit_many(requests)
        except (BudgetExceeded, InvalidRequest) as err:
            _mark_unsent([p.row_id] if p.row_id else [], str(err), url)
            if p.item is not None:
                setattr(report, p.item["action"], getattr(report, p.item["action"]) - 1)
                p.item.update(action="error", reason=str(err)[:500])
            continue
        except Exception as err:
            _mark_unsent([q.row_id for q, _ in sends[index:] if q.row_id], str(err), url)
            report.error = f"could not enqueue the documents' requests: {err}"
            log.error("documents scan: %s", report.error)
            break
        sent.extend(requests)
    return sent


def _max_bytes(settings: Settings, prices: PriceTable) -> int:
    """A file past this size is refused, its text not kept: every part's text is under the
    model's context window, and tokens average well under 16 bytes of UTF-8 (~4 in English
    prose). With the defaults (8 parts of sheepdog-mini's 8,192 tokens) that is 1 MiB."""
    window = prices.get(settings.documents_model).context_window
    return settings.documents_max_parts * window * 16


def _examine(
    session: Any,
    source: SourceDocument,
    known: dict[str, Document],
    settings: Settings,
    prices: PriceTable,
    client: Any,
    report: ScanReport,
    planned: list[Planned],
) -> None:
    """Plan one document: unchanged, refused (stored with its reason) or to send (stored
    pending, into `planned`), counted into `report` once its row is written."""
    row = known.get(source.path)
    action = "new" if row is None else "changed"
    retry = 0
    done: frozenset[int] = frozenset()
    if row is not None and row.content_hash == source.content_hash:
        if row.status != "failed":
            report.unchanged += 1
            report.items.append({"path": source.path, "action": "unchanged"})
            return
        action = "retried"
    try:
        parts = plan_parts(source, settings, prices)
        prompts = []
        for i, text in enumerate(parts, start=1):
            request = document_request(
                settings, prices, source.title, text, 0, source.content_hash, i, len(parts)
            )
            client.prepare(request)
            prompts.append(request["messages"])
        if action == "retried" and row is not None:
            retry, done = _retry_plan(session, row, prompts)
    except InvalidRequest as err:
        _store(session, row, source, status="refused", parts=0, error=str(err))
        report.refused += 1
        report.items.append({"path": source.path, "action": "refused", "reason": str(err)})
        return
    stored = _store(session, row, source, status="pending", parts=len(parts), error=None)
    setattr(report, action, getattr(report, action) + 1)
    item = {"path": source.path, "action": action, "parts": len(parts)}
    report.items.append(item)
    planned.append(Planned(source, parts, row_id=stored.id, retry=retry, item=item, done=done))


def _store(
    session: Any,
    row: Document | None,
    source: SourceDocument,
    *,
    status: str,
    parts: int,
    error: str | None,
) -> Document:
    if row is None:
        row = Document(path=source.path)
        session.add(row)
    row.title = source.title
    row.content_hash = source.content_hash
    row.size_bytes = min(source.size_bytes, 2**31 - 1)  # the column's limit
    row.status = status
    row.parts = parts
    row.error = error
    row.summary = None
    row.scanned_at = utcnow()
    session.flush()  # assigns a new row's id
    return row


def _retry_plan(
    session: Any, row: Document, prompts: list[list[dict[str, str]]]
) -> tuple[int, frozenset[int]]:
    """For a failed version's retry: its number (fresh idempotency keys), and the parts not to
    send again (answered: paid for, the summary takes them; or still open). The number is the
    time of the scan that wrote the row last, in ms: the same for two scans at once (their keys
    dedupe), another for each attempt, including one whose submit stopped with its keys held
    for requests that do not exist. The parts count only when the split is the one they
    answered: as many parts, each part's prompt (`prompts`, the new split's) the one its
    request sent (the prompt or the part size may have changed)."""
    from documents.status import version_requests

    number = int(in_utc(row.scanned_at).timestamp() * 1000)
    if row.parts != len(prompts):
        return number, frozenset()
    return number, frozenset(
        part
        for r in version_requests(session, [row])[row.id]
        if (r.status == "succeeded" or r.status not in FINAL)
        and 0 < (part := r.document_part or 1) <= len(prompts)
        and (r.body or {}).get("messages") == prompts[part - 1]
    )


def _mark_unsent(ids: list[int], reason: str, url: str) -> None:
    """Failed, with the reason: the next scan sends the document again as a retry (fresh keys;
    the parts already answered or open stay as they are)."""
    with session_scope(url) as session:
        for row in session.scalars(select(Document).where(Document.id.in_(ids))):
            row.status = "failed"
            row.error = reason[:2000]
