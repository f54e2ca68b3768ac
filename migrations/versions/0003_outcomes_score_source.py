"""who scored an outcome (user, judge, replay) and what the judge's call cost

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outcomes", sa.Column("score_source", sa.String(16), nullable=True))
    op.add_column("outcomes", sa.Column("judge_cost_usd", sa.Float, nullable=True))
    # Scores stored before sources existed came from the application: the user's.
    op.execute("UPDATE outcomes SET score_source = 'user' WHERE quality_score IS NOT NULL")


def downgrade() -> None:
    op.drop_column("outcomes", "judge_cost_usd")
    op.drop_column("outcomes", "score_source")
