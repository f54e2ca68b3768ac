"""merge_rows: a batch's events for one (query, model) merged field by field, in order."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from workers.db.repository import merge_rows


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
    first = row(cost_usd=0.01, output_tokens=9, error="timeout")
    second = row(cost_usd=0.02, embedding=b"vec")
    (merged,) = merge_rows([first, second, row()])
    assert (merged["cost_usd"], merged["output_tokens"], merged["error"]) == (0.02, 9, "timeout")
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
