"""Tables. Alembic migrations in migrations/ create them; keep both in step."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class OutcomeRow(Base):
    """What one model did with one query: the router's ground truth to learn from.

    A quality score may arrive after the usage (from a judge, or the user's
    feedback), so the row is upserted on (query_id, model); a score replaces the
    stored one if a stronger source gave it, or the same source later (by
    `scored_at`), never a weaker one (a user's score outranks a judge's;
    schemas.SCORE_SOURCE_RANK).
    """

    __tablename__ = "outcomes"
    __table_args__ = (
        sa.UniqueConstraint("query_id", "model", name="uq_outcomes_query_model"),
        sa.Index("ix_outcomes_updated_at", "updated_at"),
    )

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True
    )
    query_id: Mapped[str] = mapped_column(sa.String(200), index=True)
    model: Mapped[str] = mapped_column(sa.String(200))
    pool: Mapped[str] = mapped_column(sa.String(200), default="default")
    quality_score: Mapped[float | None] = mapped_column(sa.Float)
    score_source: Mapped[str | None] = mapped_column(sa.String(16))  # user, judge, replay
    # When the score was given (its outcome's created_at, held near its record's
    # broker timestamp): of two scores from one source the later stands, whatever
    # order they are written in. None: stored before migration 0006 (the oldest).
    scored_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    judge_cost_usd: Mapped[float | None] = mapped_column(sa.Float)
    input_tokens: Mapped[int | None] = mapped_column(sa.Integer)
    output_tokens: Mapped[int | None] = mapped_column(sa.Integer)
    cost_usd: Mapped[float | None] = mapped_column(sa.Float)
    latency_ms: Mapped[float | None] = mapped_column(sa.Float)
    error: Mapped[str | None] = mapped_column(sa.Text)
    # float32 vector of the query text, as bytes: portable and compact; `embedder`
    # names its vector space (workers/routing/embedder.py), and the text lets a
    # router of another embedder re-embed it.
    embedding: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    embedder: Mapped[str | None] = mapped_column(sa.String(200))
    query_text: Mapped[str | None] = mapped_column(sa.Text)
    # An excerpt of the model's answer (OUTCOME_RESPONSE_MAX_CHARS), for learning
    # from answers.
    response_excerpt: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now(), onupdate=sa.func.now()
    )
