"""Outcomes round-trip through PostgreSQL with the migrated schema."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from schemas import Outcome
from tests.faults import wait_until
from workers.db import migrate
from workers.db.models import OutcomeRow
from workers.db.repository import (
    Change,
    changing_outcomes,
    count_outcomes,
    iter_outcomes,
    unstorable_reason,
    upsert_outcomes,
)
from workers.services import throwaway_postgres

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
        upsert_outcomes(session, [outcome], [embedding], "test-embedder")

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


def stored_rows(engine: sa.Engine) -> dict[tuple[str, str], OutcomeRow]:
    with Session(engine) as session:
        return {(r.query_id, r.model): r for r in session.scalars(sa.select(OutcomeRow))}


def write(engine: sa.Engine, *batches: list[tuple[Outcome, np.ndarray | None]]) -> None:
    """Each batch in a transaction of its own, as the outcome writer does."""
    for batch in batches:
        with Session(engine) as session, session.begin():
            upsert_outcomes(session, [o for o, _ in batch], [e for _, e in batch], "test-embedder")


def test_usage_with_text_and_a_judge_score_in_one_batch_keep_both(
    postgres_engine: sa.Engine,
) -> None:
    embedding = np.linspace(0, 1, 384, dtype=np.float32)
    usage = Outcome(
        query_id="q", model="m", pool="gold", text="hello", output_tokens=9, cost_usd=0.01
    )
    judged = Outcome(
        query_id="q", model="m", quality_score=0.7, source="judge", judge_cost_usd=1e-4
    )
    write(postgres_engine, [(usage, embedding), (judged, None)])

    row = stored_rows(postgres_engine)[("q", "m")]
    assert (row.quality_score, row.score_source, row.pool) == (0.7, "judge", "gold")
    assert (row.cost_usd, row.output_tokens) == (pytest.approx(0.01), 9)
    assert row.judge_cost_usd == pytest.approx(1e-4)
    assert row.embedding is not None
    np.testing.assert_array_equal(np.frombuffer(row.embedding, np.float32), embedding)


# (the first score's source, the second's, whose score is kept: FIRST or SECOND)
FIRST, SECOND = 0, 1
PRECEDENCE = [
    ("user", "judge", FIRST),
    ("judge", "user", SECOND),
    ("replay", "judge", FIRST),
    ("judge", "replay", SECOND),
    ("user", "replay", FIRST),
    ("replay", "user", SECOND),
    ("judge", "judge", SECOND),  # the same source: the later score replaces
    ("replay", "replay", SECOND),
    ("user", "user", SECOND),
    (None, "judge", FIRST),  # a score without a source is the user's (Outcome v1)
]


@pytest.mark.parametrize("one_batch", [False, True], ids=["two batches", "one batch"])
@pytest.mark.parametrize(("first", "second", "kept"), PRECEDENCE)
def test_a_score_replaces_the_stored_one_only_from_a_source_as_strong(
    postgres_engine: sa.Engine, first: str | None, second: str, kept: int, one_batch: bool
) -> None:
    usage = Outcome(query_id="q", model="m", text="hi", cost_usd=0.02)
    scores = [
        Outcome(query_id="q", model="m", quality_score=0.25, source=first),  # type: ignore[arg-type]
        Outcome(query_id="q", model="m", quality_score=0.75, source=second),  # type: ignore[arg-type]
    ]
    events = [(usage, np.ones(384, np.float32)), *((s, None) for s in scores)]
    if one_batch:
        write(postgres_engine, events)
    else:
        write(postgres_engine, *([e] for e in events))

    row = stored_rows(postgres_engine)[("q", "m")]
    winner = scores[kept]
    assert (row.quality_score, row.score_source) == (winner.quality_score, winner.score_source)
    assert row.cost_usd == pytest.approx(0.02)
    assert row.embedding is not None


@pytest.mark.parametrize("one_batch", [False, True], ids=["two batches", "one batch"])
def test_a_score_only_event_leaves_the_pool_of_the_first_insert(
    postgres_engine: sa.Engine, one_batch: bool
) -> None:
    usage = Outcome(query_id="q", model="m", pool="gold", text="hi", cost_usd=0.02)
    score = Outcome(query_id="q", model="m", quality_score=1.0, source="user")  # pool "default"
    events = [(usage, np.ones(384, np.float32)), (score, None)]
    write(postgres_engine, *([events] if one_batch else ([e] for e in events)))

    row = stored_rows(postgres_engine)[("q", "m")]
    assert (row.pool, row.quality_score, row.score_source) == ("gold", 1.0, "user")
    assert row.cost_usd == pytest.approx(0.02)


def test_migration_0003_marks_the_scores_already_stored_as_the_users() -> None:
    with throwaway_postgres() as url:
        migrate.upgrade(url, "0002")
        engine = sa.create_engine(url)
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO outcomes (query_id, model, pool, quality_score, cost_usd) "
                    "VALUES ('old', 'm', 'default', 0.5, 0.01), ('old', 'n', 'default', NULL, 0.02)"
                )
            )
        migrate.upgrade(url, "head")
        try:
            rows = stored_rows(engine)
            scored, unscored = rows[("old", "m")], rows[("old", "n")]
            assert (scored.quality_score, scored.score_source) == (0.5, "user")
            assert (unscored.quality_score, unscored.score_source) == (None, None)
            assert scored.judge_cost_usd is None and unscored.judge_cost_usd is None
            assert scored.cost_usd == pytest.approx(0.01)

            # Old scores are the user's: a judge does not replace them, a new user score does.
            judge = Outcome(query_id="old", model="m", quality_score=0.0, source="judge")
            write(engine, [(judge, None)])
            assert stored_rows(engine)[("old", "m")].quality_score == 0.5
            judge_n = Outcome(query_id="old", model="n", quality_score=1.0, source="judge")
            user = Outcome(query_id="old", model="m", quality_score=1.0, source="user")
            write(engine, [(judge_n, None), (user, None)])
            rows = stored_rows(engine)
            assert (rows[("old", "m")].quality_score, rows[("old", "m")].score_source) == (
                1.0,
                "user",
            )
            assert rows[("old", "n")].score_source == "judge"
        finally:
            engine.dispose()


def test_an_answer_excerpt_is_kept_when_a_score_arrives_later(postgres_engine: sa.Engine) -> None:
    usage = Outcome(query_id="q", model="m", cost_usd=0.01, response="The answer is (B).")
    score = Outcome(query_id="q", model="m", quality_score=1.0, source="judge")
    with Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, [usage, score], [None, None])  # merged in one batch
    with Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, [score], [None])  # and again in a later one
    with Session(postgres_engine) as session:
        row = session.scalars(sa.select(OutcomeRow)).one()
    assert (row.response_excerpt, row.quality_score) == ("The answer is (B).", 1.0)


def test_a_model_asked_again_is_stored_with_its_answer_not_the_first_error(
    postgres_engine: sa.Engine,
) -> None:
    """A cascade escalation asks a panel model again after its probe failed: the
    row kept the probe's error beside the escalated answer (error was merged as a
    field left None keeps)."""
    failed = Outcome(query_id="q", model="m", error="HTTP 500 from the model API", text="Q?")
    answered = Outcome(query_id="q", model="m", cost_usd=0.01, response="(B)", text="Q?")
    score = Outcome(query_id="q", model="m", quality_score=1.0, source="judge")
    for batch in ([failed], [answered], [score], [failed]):
        with Session(postgres_engine) as session, session.begin():
            upsert_outcomes(session, batch, [None])
    with Session(postgres_engine) as session:
        row = session.scalars(sa.select(OutcomeRow)).one()
    assert (row.error, row.response_excerpt, row.quality_score) == (None, "(B)", 1.0)


@pytest.mark.parametrize(
    ("fields", "refusal"),
    [
        ({"text": "a\u0000b"}, sa.exc.DataError),
        ({"response": "\u0000"}, sa.exc.DataError),
        ({"input_tokens": 2**31}, sa.exc.DataError),
        ({"pool": "p" * 201}, sa.exc.DataError),
        ({"text": "a\ud800b"}, UnicodeEncodeError),  # psycopg's, not even wrapped
    ],
)
def test_what_unstorable_reason_refuses_postgres_refuses(
    postgres_engine: sa.Engine, fields: dict[str, object], refusal: type[Exception]
) -> None:
    """The writer's check states the database's real limits: each value it refuses
    fails the write (so the whole batch would), and values at the limits are stored."""
    outcome = Outcome(query_id="q", model="m", **fields)  # type: ignore[arg-type]
    assert unstorable_reason(outcome) is not None
    with pytest.raises(refusal), Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, [outcome], [None])
    at_limits = Outcome(query_id="q", model="m", input_tokens=2**31 - 1, pool="p" * 200, text="ok")
    assert unstorable_reason(at_limits) is None
    with Session(postgres_engine) as session, session.begin():
        upsert_outcomes(session, [at_limits], [None])
    with Session(postgres_engine) as session:
        assert count_outcomes(session) == 1


@pytest.mark.parametrize("one_batch", [False, True], ids=["two batches", "one batch"])
def test_an_older_score_written_late_does_not_replace_a_newer_one_from_its_source(
    postgres_engine: sa.Engine, one_batch: bool
) -> None:
    """The user scores twice; an outcome writer retrying the first score through a
    database outage writes it after the partition's new owner stored both (it took
    the partition in a rebalance meanwhile). The second score stands."""
    usage = Outcome(query_id="q", model="m", text="hi", cost_usd=0.02)
    first_at = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    first = Outcome(query_id="q", model="m", quality_score=0.2, source="user", created_at=first_at)
    second = first.model_copy(
        update={"quality_score": 0.9, "created_at": first_at + timedelta(seconds=5)}
    )
    scores = [(first, None), (second, None)]
    write(postgres_engine, [(usage, np.ones(384, np.float32))])
    write(postgres_engine, *([scores] if one_batch else ([s] for s in scores)))  # the new owner
    write(postgres_engine, [(first, None)])  # the old owner's retry

    row = stored_rows(postgres_engine)[("q", "m")]
    assert (row.quality_score, row.score_source) == (0.9, "user")
    assert row.cost_usd == pytest.approx(0.02)
    # A judge's score, however late, still does not replace the user's.
    judge = Outcome(query_id="q", model="m", quality_score=0.0, source="judge")
    write(postgres_engine, [(judge, None)])
    assert stored_rows(postgres_engine)[("q", "m")].quality_score == 0.9


@pytest.mark.parametrize("one_batch", [False, True], ids=["two batches", "one batch"])
def test_an_answer_without_an_excerpt_stands_with_its_usage_against_an_error(
    postgres_engine: sa.Engine, one_batch: bool
) -> None:
    """A cascade's probe fails, the model's escalated answer has no excerpt
    (OUTCOME_RESPONSE_MAX_CHARS=0, an empty reply, Outcome v1/v2), the judge scores
    it, the probe's error is read again: stored is the answer with its own usage.
    Before, the error stayed beside the answer, and the error read again put its
    latency in place of the answer's."""
    failed = Outcome(query_id="q", model="m", error="HTTP 500", latency_ms=5.0, text="Q?")
    answered = Outcome(
        query_id="q", model="m", latency_ms=100.0, cost_usd=2.0, output_tokens=9, text="Q?"
    )
    score = Outcome(query_id="q", model="m", quality_score=1.0, source="judge")
    events = [(failed, None), (answered, None), (score, None), (failed, None)]
    write(postgres_engine, *([events] if one_batch else ([e] for e in events)))

    row = stored_rows(postgres_engine)[("q", "m")]
    assert (row.error, row.latency_ms, row.output_tokens) == (None, 100.0, 9)
    assert (row.cost_usd, row.quality_score) == (pytest.approx(2.0), 1.0)


def write_as_the_writer(
    engine: sa.Engine, outcomes: Sequence[Outcome], pids: queue.Queue[int] | None = None
) -> list[tuple[Outcome, Change]]:
    """What the outcome writer does with a batch (workers/stream/outcomes.py `write`):
    tell the changes, then store, in one transaction; the changes it would count.
    Its backend's pid goes to `pids` first, for pg_stat_activity."""
    with Session(engine) as session, session.begin():
        if pids is not None:
            pids.put(session.execute(sa.select(sa.func.pg_backend_pid())).scalar_one())
        changed = changing_outcomes(session, outcomes)
        upsert_outcomes(session, outcomes, [None] * len(outcomes))
    return changed


def waits_on_a_lock(engine: sa.Engine, pid: int, writer: Future[object]) -> bool:
    """Whether backend `pid` waits on a lock; fails at once if its writer is done."""
    assert not writer.done(), f"the second writer did not wait: it counted {writer.result()}"
    with engine.connect() as connection:
        wait = connection.execute(
            sa.select(sa.column("wait_event_type"))
            .select_from(sa.table("pg_stat_activity"))
            .where(sa.column("pid") == pid)
        ).scalar_one_or_none()
    return wait == "Lock"


def test_a_second_writer_of_the_same_new_outcome_waits_and_counts_nothing(
    postgres_engine: sa.Engine,
) -> None:
    """A partition's old owner retrying its batch while the new owner writes it: no row
    of the key is stored yet, so FOR UPDATE locked nothing and both counted it
    (README: "may both count it"). Now the second waits for the first's commit and
    reads the row as written: no change."""
    outcome = Outcome(query_id="q", model="m", text="Is 7 prime?", cost_usd=0.01)
    pids: queue.Queue[int] = queue.Queue()
    with ThreadPoolExecutor(1) as pool, Session(postgres_engine) as first:
        assert changing_outcomes(first, [outcome]) == [(outcome, Change(True, True, False))]
        second = pool.submit(write_as_the_writer, postgres_engine, [outcome], pids)
        pid = pids.get(timeout=30)
        wait_until(
            lambda: waits_on_a_lock(postgres_engine, pid, second), 30, "the second writer waits"
        )
        upsert_outcomes(first, [outcome], [None])
        first.commit()
        assert second.result(timeout=30) == []
    with Session(postgres_engine) as session:
        assert count_outcomes(session) == 1


def test_writers_of_overlapping_new_batches_in_opposite_orders_count_each_once(
    postgres_engine: sa.Engine,
) -> None:
    """Two writers, one batch in each order, started together, rounds of new keys:
    both finish within the deadline (their locks, taken in one order, cannot
    deadlock) and each outcome is counted by exactly one of them."""
    start = threading.Barrier(2)

    def writer(outcomes: list[Outcome]) -> list[tuple[Outcome, Change]]:
        start.wait(timeout=30)
        return write_as_the_writer(postgres_engine, outcomes)

    with ThreadPoolExecutor(2) as pool:
        for round_ in range(10):
            batch = [Outcome(query_id=f"q{round_}.{i}", model="m", cost_usd=1.0) for i in range(50)]
            forward = pool.submit(writer, batch)
            backward = pool.submit(writer, batch[::-1])
            counted = forward.result(timeout=30) + backward.result(timeout=30)
            assert sorted(o.query_id for o, _ in counted) == sorted(o.query_id for o in batch)
    with Session(postgres_engine) as session:
        assert count_outcomes(session) == 500
