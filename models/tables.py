"""SQLAlchemy tables (2.0 style). Schema changes go through Alembic (models/migrations)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
USD = Numeric(20, 10)


DEFAULT_TENANT = "default"  # a request's tenant when it names none (the in-deployment client)


def in_utc(at: datetime) -> datetime:
    """`at` in UTC, a naive one taken as UTC already; OverflowError past the year 9999 there."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return in_utc(value) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), Decimal: USD, dict[str, Any]: JSON}


class BatchJob(Base):
    """One provider batch (one JSONL input file, one model). Status is the provider's own,
    plus `preparing` before the provider batch exists."""

    __tablename__ = "batch_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(100))
    provider: Mapped[str] = mapped_column(String(100), default="default")
    mode: Mapped[str] = mapped_column(String(16), default="native")
    status: Mapped[str] = mapped_column(String(16), default="preparing", index=True)
    input_file_id: Mapped[str | None] = mapped_column(String(100))
    provider_batch_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    output_file_id: Mapped[str | None] = mapped_column(String(100))
    error_file_id: Mapped[str | None] = mapped_column(String(100))
    request_count: Mapped[int] = mapped_column(Integer, default=0)
    completed_count: Mapped[int] = mapped_column(Integer, default=0)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    input_bytes: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ingested_count: Mapped[int] = mapped_column(Integer, default=0)
    malformed_lines: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[Decimal | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    submitted_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    ingested_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


DOCUMENTS_TENANT = "documents"  # the nightly document job's: only its requests link a document


class Document(Base):
    """A source document of the nightly job; each version (content hash) is sent once."""

    __tablename__ = "documents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String(1000), unique=True)
    title: Mapped[str] = mapped_column(String(500), default="")
    content_hash: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="new", index=True)
    parts: Mapped[int] = mapped_column(Integer, default=1)
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[str | None] = mapped_column(Text)
    scanned_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


OPEN_STATUSES = text("status IN ('queued', 'streaming', 'batched')")
BATCHED = text("status = 'batched'")
HAS_IDEMPOTENCY_KEY = text("idempotency_key IS NOT NULL")
HAS_DOCUMENT = text("document_id IS NOT NULL")


class Request(Base):
    """One chat-completion request from intake to its end (succeeded, failed or cancelled).

    Only lifecycle/moves.py writes `status`."""

    __tablename__ = "requests"
    # Partial indexes keep the bulk moves cheap: a row moving to an end status, or a row with
    # no idempotency key or document, adds no entry to them (a status change is never a HOT
    # update, so every full index pays one insert per moved row). Nothing looks requests up
    # by tenant (budgets and reports read their own tables), so that column has no index.
    __table_args__ = (
        Index(
            "ix_requests_claim",
            "status",
            "route",
            "model",
            "created_at",
            postgresql_where=OPEN_STATUSES,  # SQLite cannot prove `status = ?` implies it
        ),
        Index(
            "ix_requests_idempotency_key",
            "idempotency_key",
            unique=True,
            postgresql_where=HAS_IDEMPOTENCY_KEY,
            sqlite_where=HAS_IDEMPOTENCY_KEY,
        ),
        Index(
            "ix_requests_batch_job_id",
            "batch_job_id",
            postgresql_where=BATCHED,  # every query by job looks for its batched rows
        ),
        Index(
            "ix_requests_document_id",
            "document_id",
            postgresql_where=HAS_DOCUMENT,
            sqlite_where=HAS_DOCUMENT,
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    tenant: Mapped[str] = mapped_column(String(100), default=DEFAULT_TENANT)
    priority: Mapped[str] = mapped_column(String(8))
    route: Mapped[str] = mapped_column(String(8))
    # priority | stream | flex | batch (null: a row from before lanes, its route's lane)
    lane: Mapped[str | None] = mapped_column(String(8))
    lane_reason: Mapped[str | None] = mapped_column(String(200))  # why the router chose it
    model: Mapped[str] = mapped_column(String(100))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    max_cost_usd: Mapped[Decimal | None]
    deadline: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(16))  # indexed for open rows only (above)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    escalated: Mapped[bool] = mapped_column(Boolean, default=False)
    text: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    cost_usd: Mapped[Decimal | None]
    error: Mapped[str | None] = mapped_column(Text)
    batch_job_id: Mapped[str | None] = mapped_column(
        ForeignKey("batch_jobs.id", ondelete="SET NULL")
    )
    document_id: Mapped[int | None] = mapped_column(ForeignKey("documents.id", ondelete="SET NULL"))
    document_part: Mapped[int | None] = mapped_column(Integer)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))  # the request's own webhook
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    first_token_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


INTEGER_MAX = 2**31 - 1  # an Integer column's largest value (PostgreSQL refuses more)


def storable(text: str) -> str:
    """`text` as a text column can hold it on every database: PostgreSQL's text cannot hold a
    NUL, which a provider's answer may carry; it becomes U+FFFD (the replacement character), in
    what is stored and in what followers are sent alike."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def bounded(text: str, column: str) -> str:
    """`text` as the `requests` column `column` (a String) can hold it: storable, and cut to
    the column's length (a provider's finish reason, say, may be anything)."""
    return storable(text)[: max_chars(column)]


def max_chars(column: str) -> int:
    """The length limit of one of the `requests` table's String columns."""
    kind = Request.__table__.c[column].type
    assert isinstance(kind, String) and kind.length is not None
    return kind.length


class CostEntry(Base):
    """The ledger: one row per finished request that cost money, written exactly once."""

    __tablename__ = "cost_ledger"

    # Keyed by the request (one entry each). No foreign key: the ledger is the accounting
    # record and outlives purged requests, and a bulk ingest skips one lookup and row lock on
    # `requests` per entry.
    request_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(100))
    route: Mapped[str] = mapped_column(String(8))
    # The tier that served the call (its rate is cost_usd): standard | batch | flex | priority.
    tier: Mapped[str] = mapped_column(String(8), default="standard", server_default="standard")
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[Decimal]
    standard_cost_usd: Mapped[Decimal]
    estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        # Budget checks: a tenant's spend since a date.
        Index("ix_cost_ledger_tenant_created_at", "tenant", "created_at"),
        # Reports by time window over an append-only table in time order: BRIN on PostgreSQL.
        Index("ix_cost_ledger_created_at", "created_at", postgresql_using="brin"),
    )


class Budget(Base):
    """A tenant's spending limits (USD); a missing row or a null limit means unlimited."""

    __tablename__ = "budgets"

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    daily_usd: Mapped[Decimal | None]
    monthly_usd: Mapped[Decimal | None]
    allow_downgrade: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Reservation(Base):
    """A request's worst-case cost held against its tenant's budget until it finishes."""

    __tablename__ = "budget_reservations"

    request_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    amount_usd: Mapped[Decimal]
    settled_usd: Mapped[Decimal | None]
    state: Mapped[str] = mapped_column(String(12), default="held", index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    settled_at: Mapped[datetime | None]


class ApiKey(Base):
    """A tenant's key to the HTTP front door. Only the SHA-256 of the key is stored; the key
    itself is printed once, when it is made (sheepdog/tenant_keys.py)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(100), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # every call looks it up
    prefix: Mapped[str] = mapped_column(String(16))  # the key's first characters, for lists
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)  # null: the default
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
