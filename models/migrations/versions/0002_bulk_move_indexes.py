"""cheaper bulk moves: partial indexes on requests, no foreign key from the ledger

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 16:55:00

A status change is never a HOT update, so each full index on `requests` costs one insert per
moved row; a batch ingest moves tens of thousands at a time. `status` alone was redundant with
the claim index (same leading column); the claim index only needs open rows, the job index only
batched ones (every query by job asks for those; the job's cost is now added up as it is
ingested); rows without an idempotency key or a document need no entry in those indexes;
nothing looks requests up by tenant. The cost ledger is the
accounting record: it outlives purged requests, and its inserts skip a lookup and row lock on
`requests` each.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OPEN = sa.text("status IN ('queued', 'streaming', 'batched')")
BATCHED = sa.text("status = 'batched'")
HAS_KEY = sa.text("idempotency_key IS NOT NULL")
HAS_DOCUMENT = sa.text("document_id IS NOT NULL")
CLAIM = ["status", "route", "model", "created_at"]


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch_op:
        batch_op.drop_index("ix_requests_status")
        batch_op.drop_index("ix_requests_claim")
        batch_op.drop_index("ix_requests_document_id")
        batch_op.drop_index("ix_requests_tenant")
        batch_op.drop_index("ix_requests_batch_job_id")
        batch_op.drop_constraint("uq_requests_idempotency_key", type_="unique")
        batch_op.create_index(
            "ix_requests_batch_job_id", ["batch_job_id"], postgresql_where=BATCHED
        )
        batch_op.create_index(
            "ix_requests_claim", CLAIM, postgresql_where=OPEN
        )
        batch_op.create_index(
            "ix_requests_document_id",
            ["document_id"],
            postgresql_where=HAS_DOCUMENT,
            sqlite_where=HAS_DOCUMENT,
        )
        batch_op.create_index(
            "ix_requests_idempotency_key",
            ["idempotency_key"],
            unique=True,
            postgresql_where=HAS_KEY,
            sqlite_where=HAS_KEY,
        )


    with op.batch_alter_table("cost_ledger") as batch_op:
        batch_op.drop_constraint("fk_cost_ledger_request_id_requests", type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("cost_ledger") as batch_op:
        batch_op.create_foreign_key(
            "fk_cost_ledger_request_id_requests",
            "requests",
            ["request_id"],
            ["id"],
            ondelete="CASCADE",
        )
    with op.batch_alter_table("requests") as batch_op:
        batch_op.drop_index("ix_requests_idempotency_key")
        batch_op.drop_index("ix_requests_document_id")
        batch_op.drop_index("ix_requests_claim")
        batch_op.drop_index("ix_requests_batch_job_id")
        batch_op.create_index("ix_requests_batch_job_id", ["batch_job_id"])
        batch_op.create_index("ix_requests_tenant", ["tenant"])
        batch_op.create_unique_constraint("uq_requests_idempotency_key", ["idempotency_key"])
        batch_op.create_index("ix_requests_document_id", ["document_id"])
        batch_op.create_index("ix_requests_claim", CLAIM)
        batch_op.create_index("ix_requests_status", ["status"])
