"""the query's text and which embedder made its stored vector

A router whose embedder differs from the one that made a stored vector
re-embeds the text instead of comparing vectors of two spaces.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The only embedder before this revision.
EARLIER_EMBEDDER = "all-MiniLM-L6-v2"


def upgrade() -> None:
    op.add_column("outcomes", sa.Column("query_text", sa.Text, nullable=True))
    op.add_column("outcomes", sa.Column("embedder", sa.String(200), nullable=True))
    op.execute(
        sa.text("UPDATE outcomes SET embedder = :name WHERE embedding IS NOT NULL").bindparams(
            name=EARLIER_EMBEDDER
        )
    )


def downgrade() -> None:
    op.drop_column("outcomes", "embedder")
    op.drop_column("outcomes", "query_text")
