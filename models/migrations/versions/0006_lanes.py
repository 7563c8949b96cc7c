"""lanes: the lane a request took and why; the tier each ledger entry was billed at

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 16:10:00

`requests.lane` (priority | stream | flex | batch; null on rows from before lanes: their
route's lane) and `requests.lane_reason`, the router's explanation. `cost_ledger.tier`
(standard | batch | flex | priority): the tier that served the call, whose rate was billed;
entries from before are their route's tier.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as table:
        table.add_column(sa.Column("lane", sa.String(8), nullable=True))
        table.add_column(sa.Column("lane_reason", sa.String(200), nullable=True))
    with op.batch_alter_table("cost_ledger") as table:
        table.add_column(
            sa.Column("tier", sa.String(8), nullable=False, server_default="standard")
        )
    op.execute("UPDATE cost_ledger SET tier = 'batch' WHERE route = 'batch'")


def downgrade() -> None:
    with op.batch_alter_table("cost_ledger") as table:
        table.drop_column("tier")
    with op.batch_alter_table("requests") as table:
        table.drop_column("lane_reason")
        table.drop_column("lane")
