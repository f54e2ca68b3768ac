"""when each stored score was given

Of two scores for one (query_id, model) from the same source, the later one
stands, whatever order they are written in: an outcome writer that retried a
batch through a database outage after a rebalance took its partition away could
otherwise write a user's first score over the second, which the partition's new
owner had already stored. Scores stored before have none and count as the oldest.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outcomes", sa.Column("scored_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("outcomes", "scored_at")
