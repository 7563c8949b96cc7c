"""The documents scan on a temp folder: new, changed, unchanged, split and refused documents."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from core.db import session_scope
from core.settings import Settings
from documents.scan import scan_documents
from documents.split import split_text
from documents.status import export, refresh
from models.migrate import upgrade
from models.tables import Document
from rules.tokens import count_tokens
from sheepdog.client import Client
from tests.fixtures.services import redis_db

SCAN_REDIS = redis_db(10)  # its intake messages must not reach the test workers


@pytest.fixture
def scan_settings(tmp_path: Path) -> Iterator[Settings]:
    # A database of its own: the test counts the queued rows its scans wrote.
    database_url = f"sqlite:///{tmp_path / 'scan.db'}"
    upgrade(database_url)
    r = redis.Redis.from_url(SCAN_REDIS)
    r.flushdb()
    yield Settings(
        redis_url=SCAN_REDIS,
        database_url=database_url,
        documents_glob=f"{tmp_path}/**/*.md|notes/*.txt",
        documents_model="sheepdog-mini",
        documents_max_parts=2,
    )
    r.flushdb()


def _queued_intake(settings: Settings) -> list[dict]:
    """The documents' requests waiting for a batch: the producer writes each row before
    `submit` returns (no worker runs here), in the shape of an intake item."""
    from models.tables import Request

    with session_scope(settings.database_url) as session:
        rows = session.scalars(
            select(Request).where(Request.tenant == "documents", Request.status == "queued")
        ).all()
        return [
            {
                "route": row.route,
                "body": row.body,
                "request": {"priority": row.priority, "metadata": row.metadata_ or {}},
            }
            for row in rows
        ]


def _rows(settings: Settings, tmp_path: Path) -> dict[str, Document]:
    with session_scope(settings.database_url) as session:
        docs = session.scalars(select(Document).where(Document.path.like(f"{tmp_path}%")))
        return {Path(d.path).name: d for d in docs}


@pytest.mark.unit
def test_split_text_respects_budget_and_keeps_every_word() -> None:
    text = "\n\n".join(" ".join(f"w{p}_{i}" for i in range(70)) for p in range(10))
    parts = split_text(text, 150)
    assert all(count_tokens(p) <= 150 for p in parts)
    assert " ".join(parts).split() == text.split()
    one_line = " ".join(f"x{i}" for i in range(500))
    assert all(count_tokens(p) <= 100 for p in split_text(one_line, 100))


def test_scan_new_changed_unchanged_split_refused(scan_settings: Settings, tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (tmp_path / "a.md").write_text("# Alpha runbook\n\nRestart the thing, then check the gauge.\n")
    (notes / "b.txt").write_text("Beta meeting notes\n\nWe agreed to ship on Friday.\n")
    words = lambda n: "\n\n".join(  # noqa: E731
        " ".join(f"word{p}x{i}" for i in range(100)) for p in range(n // 100)
    )
    (tmp_path / "long.md").write_text("# Long\n\n" + words(9000))  # two parts of sheepdog-mini
    (tmp_path / "huge.md").write_text("# Huge\n\n" + words(20000))  # over max_parts=2
    (tmp_path / "empty.md").write_text("   \n")
    (tmp_path / "skip.txt").write_text("not matched by the globs")

    client = Client(scan_settings)
    report = scan_documents(scan_settings, root=tmp_path, client=client)
    assert report.error is None
    assert (report.found, report.new, report.refused) == (5, 3, 2)
    assert report.requests == 4  # a, b, long x2
    rows = _rows(scan_settings, tmp_path)
    assert rows["long.md"].parts == 2 and rows["long.md"].status == "pending"
    assert rows["huge.md"].status == "refused" and "over the limit of 2" in rows["huge.md"].error
    assert rows["empty.md"].status == "refused" and rows["empty.md"].error == "empty document"
    assert rows["a.md"].title == "Alpha runbook" and len(rows["a.md"].content_hash) == 64

    items = _queued_intake(scan_settings)
    assert len(items) == 4
    for item in items:
        meta = item["request"]["metadata"]
        assert meta["tenant"] == "documents" and item["route"] == "batch"
        assert item["request"]["priority"] == "low"
        assert int(meta["document_id"]) in {r.id for r in rows.values()}
    long_parts = sorted(
        i["request"]["metadata"]["document_part"]
        for i in items
        if i["request"]["metadata"]["document_id"] == str(rows["long.md"].id)
    )
    assert long_parts == ["1", "2"]
    assert any("(part 2 of 2)" in i["body"]["messages"][0]["content"] for i in items)

    # Unchanged: nothing sent again. Changed: one new request for that document only.
    (notes / "b.txt").write_text("Beta meeting notes\n\nWe agreed to ship on Monday instead.\n")
    again = scan_documents(scan_settings, root=tmp_path, client=client)
    assert (again.changed, again.unchanged, again.new, again.requests) == (1, 4, 0, 1)
    assert len(_queued_intake(scan_settings)) == 5
    assert _rows(scan_settings, tmp_path)["b.txt"].content_hash != rows["b.txt"].content_hash

    # Refused documents keep their hash: unchanged, not re-examined each night.
    third = scan_documents(scan_settings, root=tmp_path, client=client)
    assert third.requests == 0 and third.unchanged == 5

    with session_scope(scan_settings.database_url) as session:
        views = [v for v in refresh(session) if v.path.startswith(str(tmp_path))]
    csv_text = export(views, "csv")
    assert csv_text.splitlines()[0] == "path,title,hash,status,parts,error,summary"
    assert "pending" in csv_text and "refused" in csv_text


def test_a_second_scan_while_one_runs_is_skipped(scan_settings: Settings) -> None:
    from core import keys

    r = redis.Redis.from_url(scan_settings.redis_url)
    r.set(keys.of(scan_settings).documents_lock, "someone", ex=30)
    report = scan_documents(scan_settings)
    assert report.skipped and report.requests == 0


def test_a_scan_renews_its_lock_and_stops_when_it_lost_it(
    scan_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan's lock had one TTL (10 min) for the whole scan: a longer one (many files, a slow
    disk) ran on unlocked, and a second scan could start beside it. It is renewed as the scan
    goes; one that finds the lock taken by another stops before its rows commit: no document
    row, no request."""
    import documents.scan as scan_module
    from core import keys

    lock_key = keys.of(scan_settings).documents_lock
    r = redis.Redis.from_url(scan_settings.redis_url)
    for name in ("a.md", "b.md"):
        (tmp_path / name).write_text(f"# {name}\n\nSome text.\n")
    read, ttls = scan_module.read_document, []

    def read_and_check(path: Path, max_bytes: int) -> object:
        ttls.append(r.pttl(lock_key))
        r.pexpire(lock_key, 2_000)  # most of its TTL gone, as after a long stretch of files
        return read(path, max_bytes)

    monkeypatch.setattr(scan_module, "read_document", read_and_check)
    monkeypatch.setattr(scan_module, "LOCK_RENEW_S", 0.0)
    report = scan_documents(scan_settings, root=tmp_path, client=Client(scan_settings))
    assert report.error is None and report.requests == 2, report
    assert ttls[0] > 500_000 and ttls[1] > 500_000, ttls  # renewed before each file

    (tmp_path / "c.md").write_text("# c\n\nNew text.\n")

    def read_and_lose(path: Path, max_bytes: int) -> object:
        r.set(lock_key, "another scan", ex=30)  # this one's TTL ran out; another took it
        return read(path, max_bytes)

    monkeypatch.setattr(scan_module, "read_document", read_and_lose)
    lost = scan_documents(scan_settings, root=tmp_path, client=Client(scan_settings))
    assert lost.error is not None and "lock expired" in lost.error, lost
    assert "c.md" not in _rows(scan_settings, tmp_path)
    assert len(_queued_intake(scan_settings)) == 2
    assert r.get(lock_key) == b"another scan"  # the other scan's lock is left alone


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_settings(request: pytest.FixtureRequest, scan_settings: Settings) -> Iterator[Settings]:
    """scan_settings on SQLite, or on a PostgreSQL database of its own (which, unlike SQLite,
    refuses a NUL in text and a string over its column's length)."""
    if request.param == "sqlite":
        yield scan_settings
        return
    from tests.fixtures.pg import create_database, drop_database

    url = create_database("sheepdog_docs")
    try:
        yield scan_settings.model_copy(update={"database_url": url})
    finally:
        drop_database(url)


def test_a_bad_file_fails_alone_and_the_scan_goes_on(
    any_db_settings: Settings, tmp_path: Path
) -> None:
    """A file too large to ever fit (refused, hashed as it is read), a path longer than the
    table's column, and a title with a NUL (a UTF-16 file without a BOM reads as UTF-8 full of
    NULs) each end as that file's error or refusal with a reason; the good file is still sent.
    Before, a database refusal of one row rolled back every document's and sent nothing,
    every night."""
    settings = any_db_settings
    (tmp_path / "good.md").write_text("# Good\n\nA short runbook.\n")
    (tmp_path / "big.md").write_bytes(b"# Big\n\n" + b"word " * 60_000)  # 300 KB > 2 parts' bytes
    (tmp_path / "utf16.md").write_bytes("Title\n\nbody text here\n".encode("utf-16-le"))
    deep = tmp_path
    for i in range(5):
        deep = deep / (f"d{i}" + "x" * 200)
    deep.mkdir(parents=True)
    (deep / "long-path.md").write_text("# Deep\n\nSomething.\n")

    report = scan_documents(settings, root=tmp_path, client=Client(settings))
    assert report.error is None, report.error
    by_name = {Path(i["path"]).name: i for i in report.items}
    utf16_sent = by_name["utf16.md"]["action"] == "new"
    assert by_name["good.md"]["action"] == "new" and report.requests == 1 + utf16_sent
    assert by_name["big.md"]["action"] == "refused"  # its row says why, and it stays so
    assert "bytes, over the 262,144" in by_name["big.md"]["reason"]
    assert by_name["long-path.md"]["action"] == "error"
    assert "over 1000 characters" in by_name["long-path.md"]["reason"]
    assert by_name["utf16.md"]["action"] in ("new", "refused"), by_name["utf16.md"]
    rows = _rows(settings, tmp_path)
    assert set(rows) == {"good.md", "utf16.md", "big.md"} and "\x00" not in rows["utf16.md"].title
    assert rows["big.md"].status == "refused" and len(rows["big.md"].content_hash) == 64
    assert len(_queued_intake(settings)) == 1 + utf16_sent


class _StopsBeforeSending(Client):
    """A scan's client that stops as a killed process would: after claiming the requests'
    idempotency keys and holding their budget, before any message or row exists."""

    def _enqueue(self, items: object) -> None:  # type: ignore[override]
        raise KeyboardInterrupt


def test_a_document_whose_scan_stopped_before_its_submit_is_sent_again(
    any_db_settings: Settings, tmp_path: Path
) -> None:
    """The scan writes a document's row (pending, its hash) before its requests exist. Stopped
    in between, the row stayed pending with no request forever: every later scan took it as
    unchanged. An hour on it is failed with the reason, and the next scan sends it with fresh
    idempotency keys (the stopped submit's are still held, for requests that do not exist)."""
    settings = any_db_settings
    (tmp_path / "a.md").write_text("# Alpha\n\nRestart the thing.\n")
    with pytest.raises(KeyboardInterrupt):
        scan_documents(settings, root=tmp_path, client=_StopsBeforeSending(settings))
    row = _rows(settings, tmp_path)["a.md"]
    assert row.status == "pending" and _queued_intake(settings) == []

    client = Client(settings)
    soon = scan_documents(settings, root=tmp_path, client=client)
    assert soon.unchanged == 1 and soon.requests == 0  # within the hour: its scan may still run

    with session_scope(settings.database_url) as session:
        doc = session.get(Document, row.id)
        assert doc is not None
        doc.scanned_at = doc.scanned_at - timedelta(hours=2)
    later = scan_documents(settings, root=tmp_path, client=client)
    assert (later.retried, later.requests) == (1, 1), later.items
    items = _queued_intake(settings)
    assert len(items) == 1 and items[0]["request"]["metadata"]["document_id"] == str(row.id)
    assert _rows(settings, tmp_path)["a.md"].status == "pending"

    # Its request fails; the retry's scan stops the same way (its keys held); the next one
    # sends it all the same, with keys of its own, not the stopped retry's again.
    _end_parts(settings, row.id, {1: ("failed", "provider said no")})
    with pytest.raises(KeyboardInterrupt):
        scan_documents(settings, root=tmp_path, client=_StopsBeforeSending(settings))
    last = scan_documents(settings, root=tmp_path, client=client)
    assert (last.retried, last.requests) == (1, 1), last.items
    assert len(_queued_intake(settings)) == 1  # a new request, queued


def test_the_job_writes_its_rows_when_producers_do_not(scan_settings: Settings, tmp_path: Path):
    """With SHEEPDOG_PRODUCER_WRITES_ROWS=0 the rows were the intake worker's: behind an intake
    backlog of over an hour, a document had no request yet, was taken as never sent, and was
    sent again. The job writes its rows itself (no intake worker runs here)."""
    settings = scan_settings.model_copy(update={"producer_writes_rows": False})
    (tmp_path / "a.md").write_text("# Alpha\n\nThe backlog is long tonight.\n")
    first = scan_documents(settings, root=tmp_path)
    assert first.requests == 1 and len(_queued_intake(settings)) == 1
    row = _rows(settings, tmp_path)["a.md"]
    with session_scope(settings.database_url) as session:
        doc = session.get(Document, row.id)
        assert doc is not None
        doc.scanned_at = doc.scanned_at - timedelta(hours=2)
    later = scan_documents(settings, root=tmp_path)
    assert (later.unchanged, later.requests) == (1, 0), later.items
    assert _rows(settings, tmp_path)["a.md"].status == "pending"


def test_a_budget_refusal_fails_only_the_documents_it_refuses(
    any_db_settings: Settings, tmp_path: Path
) -> None:
    """One submit for the whole night was all or nothing: a budget with room for some of the
    night's documents refused every one, and the next night the same again. The refused
    document is failed with the reason, for the next scan; the others go tonight."""
    from tests.fixtures.costs import budget

    settings = any_db_settings
    (tmp_path / "a.md").write_text("# Alpha\n\nRestart the thing.\n")
    words = "\n\n".join(" ".join(f"w{p}x{i}" for i in range(100)) for p in range(90))
    (tmp_path / "long.md").write_text("# Long\n\n" + words)  # two parts of ~4,500 tokens
    budget(settings.database_url, "documents", daily_usd="0.0003")  # room for a.md only

    report = scan_documents(settings, root=tmp_path, client=Client(settings))
    assert report.error is None, report.error
    by_name = {Path(i["path"]).name: i for i in report.items}
    assert by_name["a.md"]["action"] == "new" and report.requests == 1, report.items
    assert by_name["long.md"]["action"] == "error" and "budget" in by_name["long.md"]["reason"]
    assert report.new == 1
    rows = _rows(settings, tmp_path)
    assert rows["a.md"].status == "pending"
    assert rows["long.md"].status == "failed" and "budget" in (rows["long.md"].error or "")
    items = _queued_intake(settings)
    assert [i["request"]["metadata"]["document_id"] for i in items] == [str(rows["a.md"].id)]

    # With room again, the next scan sends it as a retry (its keys released by the refusal).
    budget(settings.database_url, "documents", daily_usd="1")
    again = scan_documents(settings, root=tmp_path, client=Client(settings))
    assert (again.retried, again.unchanged, again.requests) == (1, 1, 2), again.items
    assert len(_queued_intake(settings)) == 3


def _end_parts(settings: Settings, doc_id: int, ends: dict[int, tuple[str, str]]) -> None:
    """End the open requests of document `doc_id`'s parts as a batch would have: part ->
    (status, text or error)."""
    from sqlalchemy import update

    from models.tables import Request

    with session_scope(settings.database_url) as session:
        for part, (status, value) in ends.items():
            field = "text" if status == "succeeded" else "error"
            session.execute(
                update(Request)
                .where(
                    Request.document_id == doc_id,
                    Request.document_part == part,
                    Request.status == "queued",
                )
                .values(status=status, **{field: value})
            )


def test_a_retry_sends_only_the_parts_not_answered(
    any_db_settings: Settings, tmp_path: Path
) -> None:
    """A failed document's retry sent every part again, the answered ones too (paid twice);
    a second retry named the first one's keys again and sent nothing. Now: only the parts with
    no answer, each retry with keys of its own; the summary joins the parts' answers. A
    document whose parts were only cancelled is `cancelled`, and not sent again."""
    settings = any_db_settings
    words = "\n\n".join(" ".join(f"w{p}x{i}" for i in range(100)) for p in range(90))
    (tmp_path / "long.md").write_text("# Long\n\n" + words)  # two parts
    (tmp_path / "short.md").write_text("# Short\n\nOne part.\n")
    client = Client(settings)
    assert scan_documents(settings, root=tmp_path, client=client).requests == 3
    rows = _rows(settings, tmp_path)
    long_id, short_id = rows["long.md"].id, rows["short.md"].id

    _end_parts(settings, long_id, {1: ("succeeded", "S1"), 2: ("failed", "provider said no")})
    _end_parts(settings, short_id, {1: ("cancelled", "cancelled by an operator")})
    first = scan_documents(settings, root=tmp_path, client=client)
    assert (first.retried, first.unchanged, first.requests) == (1, 1, 1), first.items
    assert _rows(settings, tmp_path)["short.md"].status == "cancelled"

    _end_parts(settings, long_id, {2: ("failed", "provider said no again")})
    second = scan_documents(settings, root=tmp_path, client=client)
    assert (second.retried, second.requests) == (1, 1), second.items
    queued = [i["request"]["metadata"]["document_part"] for i in _queued_intake(settings)]
    assert queued == ["2"]  # the second retry's part 2, a request of its own

    _end_parts(settings, long_id, {2: ("succeeded", "S2")})
    with session_scope(settings.database_url) as session:
        views = {Path(v.path).name: v for v in refresh(session)}
    assert views["long.md"].status == "succeeded" and views["long.md"].summary == "S1\n\nS2"
    assert views["short.md"].status == "cancelled"


def test_a_retry_of_another_split_sends_every_part_again(
    any_db_settings: Settings, tmp_path: Path
) -> None:
    """A retry reused the answered parts when the part count was the same, though the parts
    were not (a smaller answer limit makes each part larger): text between the old and the new
    boundary was in no answered part, and the summary skipped it with the document
    `succeeded`. A part is reused only when its prompt is the one it was answered for."""
    settings = any_db_settings.model_copy(update={"documents_max_tokens": 2000})
    words = "\n\n".join(" ".join(f"w{p}x{i}" for i in range(50)) for p in range(180))
    (tmp_path / "long.md").write_text("# Long\n\n" + words)
    client = Client(settings)
    assert scan_documents(settings, root=tmp_path, client=client).requests == 2
    long_id = _rows(settings, tmp_path)["long.md"].id
    _end_parts(settings, long_id, {1: ("succeeded", "S1"), 2: ("failed", "provider said no")})
    again = settings.model_copy(update={"documents_max_tokens": 300})
    retried = scan_documents(again, root=tmp_path, client=Client(again))
    assert (retried.retried, retried.requests) == (1, 2), retried.items
    assert _rows(again, tmp_path)["long.md"].parts == 2, "the same count, another split"
