"""an excerpt of each model's answer

Learning from answers (scoring a cheap model's answer before paying for a dear
one) needs what the models answered, not only how it was scored. Bounded by
OUTCOME_RESPONSE_MAX_CHARS in the model worker.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outcomes", sa.Column("response_excerpt", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("outcomes", "response_excerpt")
