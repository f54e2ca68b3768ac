"""merge_rows: a batch's events for one (query, model) merged field by field, in order;
changing_rows: which of them change what is stored (the outcome writer counts those)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from schemas import Outcome
from workers.db.models import Base
from workers.db.repository import (
    Change,
    changing_outcomes,
    changing_rows,
    merge_rows,
    upsert_outcomes,
)


def row(query_id: str = "q", model: str = "m", **fields: Any) -> dict[str, Any]:
    """A row as upsert_outcomes builds it from an Outcome: every column, None if unsaid."""
    columns = (
        "quality_score", "score_source", "input_tokens", "output_tokens", "cost_usd",
        "latency_ms", "error", "embedding", "embedder", "query_text", "judge_cost_usd",
        "response_excerpt", "scored_at",
    )  # fmt: skip
    return (
        {"query_id": query_id, "model": model, "pool": "default"} | dict.fromkeys(columns) | fields
    )


def score(value: float, source: str | None) -> dict[str, Any]:
    return row(quality_score=value, score_source=source)


def test_rows_of_other_queries_or_models_stay_apart_in_order() -> None:
    rows = [row("q1", "m"), row("q2", "m"), row("q1", "n")]
    assert merge_rows(rows) == rows


def test_usage_then_a_judge_score_keeps_both() -> None:
    usage = row(pool="gold", output_tokens=9, cost_usd=0.01, latency_ms=80.0, embedding=b"vec")
    judged = row(quality_score=0.7, score_source="judge", judge_cost_usd=1e-4)
    (merged,) = merge_rows([usage, judged])
    assert merged == usage | {"quality_score": 0.7, "score_source": "judge", "judge_cost_usd": 1e-4}


def test_a_later_value_replaces_an_earlier_one_and_none_keeps_it() -> None:
    first = row(cost_usd=0.01, output_tokens=9, query_text="Is 7 prime?")
    second = row(cost_usd=0.02, embedding=b"vec")
    (merged,) = merge_rows([first, second, row()])
    assert (merged["cost_usd"], merged["output_tokens"], merged["query_text"]) == (
        0.02,
        9,
        "Is 7 prime?",
    )
    assert merged["embedding"] == b"vec"


def test_the_pool_is_the_first_events() -> None:
    (merged,) = merge_rows([row(pool="gold"), row(pool="default", quality_score=1.0)])
    assert merged["pool"] == "gold"


@pytest.mark.parametrize(
    ("sources", "kept"),
    [
        (["user", "judge"], 0),
        (["judge", "user"], 1),
        (["replay", "judge"], 0),
        (["judge", "replay"], 1),
        (["user", "replay"], 0),
        (["replay", "user"], 1),
        (["judge", "judge"], 1),
        (["user", "user"], 1),
        (["judge", "user", "judge", "replay"], 1),
        (["judge", "replay", "judge"], 1),
    ],
)
def test_a_score_is_replaced_only_by_one_from_a_source_as_strong(
    sources: list[str], kept: int
) -> None:
    events = [score(i / 10, source) for i, source in enumerate(sources)]
    (merged,) = merge_rows(events)
    assert (merged["quality_score"], merged["score_source"]) == (kept / 10, sources[kept])


def test_an_event_without_a_score_leaves_the_score() -> None:
    (merged,) = merge_rows([score(0.5, "user"), row(cost_usd=0.3)])
    assert (merged["quality_score"], merged["score_source"], merged["cost_usd"]) == (
        0.5,
        "user",
        0.3,
    )


def test_the_events_themselves_are_not_changed() -> None:
    events = [row(cost_usd=0.01), score(1.0, "user"), row(cost_usd=0.02)]
    before = copy.deepcopy(events)
    merge_rows(events)
    assert events == before


def test_of_two_scores_from_one_source_the_later_by_its_time_stands() -> None:
    """A retried batch read again behind later events (a rebalance during a database
    outage) must not put the older score back: time decides, not the order."""
    first = row(quality_score=0.2, score_source="user", scored_at=datetime(2026, 1, 1, tzinfo=UTC))
    second = row(quality_score=0.9, score_source="user", scored_at=datetime(2026, 1, 2, tzinfo=UTC))
    for order in ([first, second], [second, first]):
        (merged,) = merge_rows(order)
        assert (merged["quality_score"], merged["scored_at"]) == (0.9, second["scored_at"])
    # A stronger source's score stands whatever its time; a score without one is the oldest.
    judge = row(quality_score=0.5, score_source="judge", scored_at=datetime(2027, 1, 1, tzinfo=UTC))
    assert merge_rows([first, judge])[0]["quality_score"] == 0.2
    untimed = row(quality_score=0.4, score_source="user")
    assert merge_rows([untimed, first])[0]["quality_score"] == 0.2
    assert merge_rows([first, untimed])[0]["quality_score"] == 0.2


def stored(*rows: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """The rows as the outcomes table holds them, merged."""
    return {(r["query_id"], r["model"]): r for r in merge_rows(rows)}


DAY = datetime(2026, 1, 1, tzinfo=UTC)
UNCHANGED = Change(row=False, attempt=False, score=False)
USAGE = row(cost_usd=0.01, output_tokens=9, query_text="Is 7 prime?", embedding=b"vec")
JUDGED = row(quality_score=0.7, score_source="judge", scored_at=DAY, judge_cost_usd=1e-4)


def test_events_read_again_change_nothing_stored() -> None:
    """A batch read again after a restart: every event is already recorded, also the
    usage whose row a score has changed since, and one event twice in the batch."""
    assert changing_rows([USAGE, JUDGED, USAGE], stored(USAGE, JUDGED)) == [UNCHANGED] * 3
    assert changing_rows([USAGE, JUDGED, USAGE], {}) == [
        Change(row=True, attempt=True, score=False),
        Change(row=True, attempt=False, score=True),
        UNCHANGED,
    ]


def test_a_new_outcome_or_a_score_that_replaces_the_stored_one_changes_it() -> None:
    later = JUDGED | {"quality_score": 0.9, "scored_at": DAY.replace(day=2)}
    user = row(quality_score=0.2, score_source="user", scored_at=DAY)
    other = row(model="n", cost_usd=0.01)
    scored, inserted = Change(True, False, True), Change(True, True, False)
    assert changing_rows([later, user, other], stored(USAGE, JUDGED)) == [scored, scored, inserted]


def test_what_the_stored_row_keeps_changes_nothing() -> None:
    """An older score of the source (a late retry), a weaker source's, fields unsaid;
    a weaker source's score with a judge's cost not yet stored changes the row (its
    cost), not its score: the user's stays, and the judge's is not counted."""
    older = JUDGED | {"quality_score": 0.1, "scored_at": DAY.replace(year=2025)}
    user = row(quality_score=0.2, score_source="user", scored_at=DAY)
    judge = row(quality_score=0.9, score_source="judge", scored_at=DAY.replace(year=2027))
    assert changing_rows([older], stored(USAGE, JUDGED)) == [UNCHANGED]
    assert changing_rows([judge, row(), JUDGED], stored(USAGE, user)) == [
        UNCHANGED,
        UNCHANGED,
        Change(row=True, attempt=False, score=False),
    ]


def test_a_vector_made_again_is_not_a_change_of_the_outcome() -> None:
    """The writer embeds the text anew (another embedder, say): the same outcome."""
    again = USAGE | {"embedding": b"other", "embedder": "another"}
    assert changing_rows([again], stored(USAGE)) == [UNCHANGED]


def test_on_sqlite_an_outcome_stored_is_not_written_again() -> None:
    """The demo's database gives a score's time back without its zone."""
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    usage = Outcome(query_id="q", model="m", text="Is 7 prime?", cost_usd=0.01)
    judged = Outcome(query_id="q", model="m", quality_score=0.7, source="judge")
    later = judged.model_copy(update={"quality_score": 0.9, "created_at": DAY.replace(year=2100)})
    with Session(engine) as session, session.begin():
        assert changing_outcomes(session, [usage, judged]) == [
            (usage, Change(row=True, attempt=True, score=False)),
            (judged, Change(row=True, attempt=False, score=True)),
        ]
        upsert_outcomes(session, [usage, judged], [None, None])
    with Session(engine) as session, session.begin():
        assert changing_outcomes(session, [judged, usage, later]) == [
            (later, Change(row=True, attempt=False, score=True))
        ]


def test_a_model_asked_again_keeps_its_answer_not_the_first_attempts_error() -> None:
    """A cascade escalation that asks a panel model again after its probe failed:
    the row held the escalated answer beside the probe's error. An answer replaces
    the error; an error (a failed re-send after a crash) leaves a stored answer;
    a score alone leaves either."""
    failed = row(error="HTTP 500 from the model API")
    answered = row(response_excerpt="The answer is (B).", cost_usd=0.01)
    judged = row(quality_score=1.0, score_source="judge")
    (merged,) = merge_rows([failed, answered, judged])
    assert (merged["error"], merged["response_excerpt"]) == (None, "The answer is (B).")
    (merged,) = merge_rows([answered, failed])
    assert (merged["error"], merged["response_excerpt"]) == (None, "The answer is (B).")
    (merged,) = merge_rows([failed, row(error="timeout")])
    assert (merged["error"], merged["response_excerpt"]) == ("timeout", None)


def test_an_answer_after_an_error_changes_the_row_and_the_error_again_does_not() -> None:
    failed = row(error="HTTP 500 from the model API")
    answered = row(response_excerpt="(B)", cost_usd=0.01)
    assert changing_rows([failed, answered], stored(failed)) == [
        UNCHANGED,
        Change(True, True, False),
    ]
    assert changing_rows([failed], stored(answered)) == [UNCHANGED]


# A cascade's probe that failed, and the model's escalated answer, without an
# excerpt (OUTCOME_RESPONSE_MAX_CHARS=0, an empty reply, Outcome v1/v2 producers).
PROBE_FAILED = row(error="HTTP 500 from the model API", latency_ms=5.0, input_tokens=40)
ESCALATED = row(latency_ms=100.0, cost_usd=2.0, input_tokens=40, output_tokens=9)


def test_an_error_that_loses_to_a_stored_answer_leaves_the_answers_usage() -> None:
    """The usage is the attempt's: the router learns the answer's cost and latency,
    not the failed call's (before: the error's latency replaced the answer's)."""
    for answer in (ESCALATED | {"response_excerpt": "(B)"}, ESCALATED):
        (merged,) = merge_rows([answer, PROBE_FAILED])
        assert merged == answer


def test_an_answer_without_an_excerpt_replaces_an_error_and_a_score_alone_is_none() -> None:
    """An attempt is told by its error, its excerpt or its usage; an answer is one
    without error (before: only an excerpt made an answer, so the probe's error
    stayed beside the answer's usage). A score alone is no attempt."""
    judged = row(quality_score=1.0, score_source="judge", judge_cost_usd=1e-4)
    (merged,) = merge_rows([PROBE_FAILED, ESCALATED, judged])
    assert (merged["error"], merged["latency_ms"], merged["cost_usd"]) == (None, 100.0, 2.0)
    (merged,) = merge_rows([PROBE_FAILED, judged])
    assert (merged["error"], merged["latency_ms"]) == (PROBE_FAILED["error"], 5.0)


def test_an_error_and_its_answer_read_again_change_nothing() -> None:
    """Before, the error read again put its latency back and the answer its own,
    so the answer's spend was counted again on every replay."""
    events = [PROBE_FAILED, ESCALATED]
    assert changing_rows(events, {}) == [Change(True, True, False)] * 2
    assert changing_rows(events, stored(*events)) == [UNCHANGED] * 2


def test_the_stored_texts_are_not_read_back_to_tell_a_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Neither the query's text (up to ROUTER_MAX_TEXT_CHARS) nor the answer's
    excerpt is read back for every outcome of a batch: a change is told without."""
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    text, excerpt = "Is 7 prime? " * 1000, "The answer is (B). " * 100
    answered = Outcome(query_id="q", model="m", text=text, response=excerpt, cost_usd=0.01)
    with Session(engine) as session, session.begin():
        upsert_outcomes(session, [answered], [None])
    read: list[Any] = []
    execute = Session.execute

    def recording(self: Session, *args: Any, **kwargs: Any) -> Any:
        frozen = execute(self, *args, **kwargs).freeze()
        read.extend(value for r in frozen().all() for value in r)
        return frozen()

    monkeypatch.setattr(Session, "execute", recording)
    with Session(engine) as session, session.begin():
        assert changing_outcomes(session, [answered]) == []
    assert read and text not in read and excerpt not in read
