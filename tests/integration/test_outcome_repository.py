"""Outcomes round-trip through PostgreSQL with the migrated schema."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from schemas import Outcome
from workers.db.repository import count_outcomes, iter_outcomes, upsert_outcomes

pytestmark = pytest.mark.integration


def test_outcomes_are_written_and_read_back(postgres_engine: sa.Engine) -> None:
    embedding = np.linspace(-1, 1, 384, dtype=np.float32)
    outcome = Outcome(
        query_id="q1",
        model="gpt-4",
        quality_score=1.0,
        input_tokens=12,
        output_tokens=3,
        cost_usd=0.002,
        latency_ms=80.0,
    )
    with Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, [outcome], [embedding])

    with Session(postgres_engine) as session:
        stored = [record for record, _ in iter_outcomes(session)]
    print(f"wrote 1 outcome to {postgres_engine.url.database}, read back {len(stored)}")
    assert len(stored) == 1
    assert (stored[0].query_id, stored[0].model, stored[0].quality_score) == ("q1", "gpt-4", 1.0)
    assert stored[0].cost_usd == pytest.approx(0.002)
    assert stored[0].embedding is not None
    np.testing.assert_array_equal(stored[0].embedding, embedding)


def test_a_late_score_updates_the_row_and_keeps_the_usage(postgres_engine: sa.Engine) -> None:
    usage = Outcome(query_id="q1", model="m", input_tokens=40, output_tokens=9, cost_usd=0.01)
    score = Outcome(query_id="q1", model="m", quality_score=0.0)
    with Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, [usage], [None])
    with Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, [score], [None])

    with Session(postgres_engine) as session:
        ((row, _),) = list(iter_outcomes(session))
        assert count_outcomes(session) == 1
    assert row.quality_score == 0.0
    assert row.cost_usd == pytest.approx(0.01)
    assert row.output_tokens == 9


def test_duplicates_inside_one_batch_collapse_to_one_row(postgres_engine: sa.Engine) -> None:
    first = Outcome(query_id="q", model="m", quality_score=0.0)
    again = Outcome(query_id="q", model="m", quality_score=1.0)
    other = Outcome(query_id="q", model="n", quality_score=1.0)
    with Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, [first, again, other], [None, None, None])

    with Session(postgres_engine) as session:
        rows = {(r.query_id, r.model): r.quality_score for r, _ in iter_outcomes(session)}
    assert rows == {("q", "m"): 1.0, ("q", "n"): 1.0}


def test_the_schema_is_postgres_with_the_unique_key(postgres_engine: sa.Engine) -> None:
    assert postgres_engine.dialect.name == "postgresql"
    constraints = sa.inspect(postgres_engine).get_unique_constraints("outcomes")
    assert {"name": "uq_outcomes_query_model", "column_names": ["query_id", "model"]} in [
        {"name": c["name"], "column_names": c["column_names"]} for c in constraints
    ]


def test_a_batch_larger_than_one_statement_can_bind_is_stored_whole(
    postgres_engine: sa.Engine,
) -> None:
    # 7,000 rows x 10 columns is past PostgreSQL's 65,535 bound parameters.
    outcomes = [Outcome(query_id=f"q{i}", model="m", quality_score=1.0) for i in range(7000)]
    with Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, outcomes, [None] * len(outcomes))
    with Session(postgres_engine) as session:
        assert count_outcomes(session) == 7000
