"""the cost ledger is keyed by its request; fewer, cheaper indexes on it

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 20:05:00

Each ledger row cost a sequence value and four btree inserts (serial id, unique request, tenant,
created_at); a batch ingest writes tens of thousands at a time. The request id was already unique
and is what every write looks up: it becomes the primary key (the serial id was never read).
Budget checks read a tenant's spend since a date: one (tenant, created_at) index serves them.
Reports read by time window over an append-only table in time order: on PostgreSQL a BRIN index
(a few pages, nearly free to keep up) does that; SQLite keeps a btree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cost_ledger", recreate="auto") as batch_op:
        batch_op.drop_index("ix_cost_ledger_tenant")
        batch_op.drop_index("ix_cost_ledger_created_at")
        batch_op.drop_constraint("uq_cost_ledger_request_id", type_="unique")
        batch_op.drop_constraint("pk_cost_ledger", type_="primary")
        batch_op.drop_column("id")
        batch_op.create_primary_key("pk_cost_ledger", ["request_id"])
        batch_op.create_index("ix_cost_ledger_tenant_created_at", ["tenant", "created_at"])
        batch_op.create_index(
            "ix_cost_ledger_created_at", ["created_at"], postgresql_using="brin"
        )


def downgrade() -> None:
    with op.batch_alter_table("cost_ledger", recreate="auto") as batch_op:
        batch_op.drop_index("ix_cost_ledger_created_at")
        batch_op.drop_index("ix_cost_ledger_tenant_created_at")
        batch_op.drop_constraint("pk_cost_ledger", type_="primary")
        batch_op.add_column(sa.Column("id", sa.Integer(), sa.Identity(), nullable=False))
        batch_op.create_primary_key("pk_cost_ledger", ["id"])
        batch_op.create_unique_constraint("uq_cost_ledger_request_id", ["request_id"])
        batch_op.create_index("ix_cost_ledger_tenant", ["tenant"])
        batch_op.create_index("ix_cost_ledger_created_at", ["created_at"])
