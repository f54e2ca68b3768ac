"""index outcomes by last change, for the router's incremental store refresh

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_outcomes_updated_at", "outcomes", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_outcomes_updated_at", table_name="outcomes")
