"""Outcome repository: the only code that reads or writes the outcomes table."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from schemas import Outcome
from workers.db.models import OutcomeRow
from workers.routing.store import OutcomeRecord


def create_engine(database_url: str) -> sa.Engine:
    return sa.create_engine(database_url, pool_pre_ping=True)


def upsert_outcomes(
    session: Session, outcomes: Sequence[Outcome], embeddings: Sequence[np.ndarray | None]
) -> None:
    """Insert outcomes, or update the row of the same (query_id, model).

    A field that the newer event leaves None keeps its stored value, so a late
    quality score does not erase the usage recorded earlier, and vice versa.
    """
    if not outcomes:
        return
    rows = [
        {
            "query_id": o.query_id,
            "model": o.model,
            "pool": o.pool,
            "quality_score": o.quality_score,
            "input_tokens": o.input_tokens,
            "output_tokens": o.output_tokens,
            "cost_usd": o.cost_usd,
            "latency_ms": o.latency_ms,
            "error": o.error,
            "embedding": None if e is None else np.asarray(e, dtype=np.float32).tobytes(),
        }
        for o, e in zip(outcomes, embeddings, strict=True)
    ]
    # The last row of each (query_id, model) only: ON CONFLICT may not touch a
    # row twice in one statement, which PostgreSQL rejects.
    latest = {(r["query_id"], r["model"]): r for r in rows}
    statement: postgresql.Insert | sqlite.Insert
    if session.get_bind().dialect.name == "postgresql":
        statement = postgresql.insert(OutcomeRow)
    else:
        statement = sqlite.insert(OutcomeRow)
    keep_if_none = (
        "pool",
        "quality_score",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "latency_ms",
        "error",
        "embedding",
    )
    table = OutcomeRow.__table__
    statement = statement.on_conflict_do_update(
        index_elements=["query_id", "model"],
        set_={
            **{c: sa.func.coalesce(statement.excluded[c], table.c[c]) for c in keep_if_none},
            "updated_at": sa.func.now(),
        },
    )
    # A list of rows: SQLAlchemy batches them into multi-row statements that stay
    # under the database's limit on bound parameters (65,535 for PostgreSQL).
    session.execute(statement, list(latest.values()))


def iter_outcomes(
    session: Session, updated_since: datetime | None = None, batch_size: int = 5000
) -> Iterator[tuple[OutcomeRecord, datetime]]:
    """Stored outcomes (changed after `updated_since`, if given), oldest change
    first, each with the time it last changed; streamed in batches."""
    query = sa.select(
        OutcomeRow.query_id,
        OutcomeRow.model,
        OutcomeRow.quality_score,
        OutcomeRow.cost_usd,
        OutcomeRow.output_tokens,
        OutcomeRow.embedding,
        OutcomeRow.updated_at,
    ).order_by(OutcomeRow.updated_at, OutcomeRow.id)
    if updated_since is not None:
        query = query.where(OutcomeRow.updated_at > updated_since)
    for row in session.execute(query.execution_options(yield_per=batch_size)):
        record = OutcomeRecord(
            query_id=row.query_id,
            model=row.model,
            quality_score=row.quality_score,
            cost_usd=row.cost_usd,
            output_tokens=row.output_tokens,
            embedding=None if row.embedding is None else np.frombuffer(row.embedding, np.float32),
        )
        yield record, row.updated_at


def count_outcomes(session: Session, models: Iterable[str] | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(OutcomeRow)
    if models is not None:
        query = query.where(OutcomeRow.model.in_(list(models)))
    return int(session.execute(query).scalar_one())


def stored_query_ids(session: Session, query_ids: Iterable[str]) -> set[str]:
    """Which of these query ids have at least one stored outcome."""
    wanted = list(query_ids)
    if not wanted:
        return set()
    query = sa.select(OutcomeRow.query_id).where(OutcomeRow.query_id.in_(wanted)).distinct()
    return set(session.execute(query).scalars())
