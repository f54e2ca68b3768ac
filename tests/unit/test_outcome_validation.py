"""What the outcome writer accepts: an outcome PostgreSQL would refuse (and with it
the whole batch) is a dead letter with a reason naming the field."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from schemas import Outcome
from workers.config import Settings
from workers.stream.codec import BadEvent
from workers.stream.metrics import reason_kind
from workers.stream.outcomes import textless_refusals, validate_outcome, with_score_time

SETTINGS = Settings(router_models=["a", "b"])


def raw(**fields: object) -> bytes:
    return json.dumps({"query_id": "q1", "model": "a", **fields}).encode()


def test_a_storable_outcome_passes() -> None:
    outcome = validate_outcome(
        raw(text="hello", response="hi", input_tokens=2**31 - 1, pool="p" * 200), SETTINGS
    )
    assert (outcome.input_tokens, len(outcome.pool)) == (2**31 - 1, 200)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"text": "a\u0000b"}, r"text \(query_text column\): holds a NUL character"),
        ({"response": "\u0000"}, r"response \(response_excerpt column\): holds a NUL"),
        ({"error": "x\u0000"}, r"error \(error column\): holds a NUL"),
        ({"pool": "p\u0000"}, r"pool \(pool column\): holds a NUL"),
        ({"input_tokens": 2**31}, r"input_tokens \(input_tokens column\): outside the 32-bit"),
        ({"output_tokens": 2**40}, r"output_tokens \(output_tokens column\): outside the 32-bit"),
        ({"pool": "p" * 201}, r"pool \(pool column\): 201 characters, more than the column's 200"),
        ({"text": "a\ud800b"}, r"text \(query_text column\): holds a lone surrogate at"),
    ],
)
def test_what_the_database_refuses_is_a_bad_event(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(BadEvent, match=f"outcome the database cannot store: {reason}"):
        validate_outcome(raw(**fields), SETTINGS)


@pytest.mark.parametrize("field", ["cost_usd", "latency_ms", "judge_cost_usd"])
def test_a_number_that_overflows_to_infinity_is_a_bad_event(field: str) -> None:
    """1e400 holds no NaN or Infinity for the codec to refuse, yet reads as inf: a
    cost of inf booked in the pool's ledger left NaN there and every later window
    of the pool started from an empty account."""
    with pytest.raises(BadEvent, match=f"{field}.*finite number"):
        validate_outcome(f'{{"query_id": "q1", "model": "a", "{field}": 1e400}}'.encode(), SETTINGS)


def test_a_textless_outcome_must_name_a_stored_or_batched_query_model_pair() -> None:
    """Feedback is checked by (query_id, model): the query being stored for another
    model is not enough (it would insert a phantom row with a score and no answer)."""
    usage_b = Outcome(query_id="q2", model="b", text="hi")
    score = {
        pair: Outcome(query_id=pair[0], model=pair[1], quality_score=1.0)
        for pair in [("q1", "a"), ("q1", "b"), ("q2", "b"), ("q2", "a"), ("q3", "a")]
    }
    refused = textless_refusals([usage_b, *score.values()], stored={"q1": {"a"}})
    assert refused == {
        ("q1", "b"): "outcome for query 'q1' without its text names model 'b', "
        "which never answered it (answered: ['a'])",
        ("q2", "a"): "outcome for query 'q2' without its text names model 'a', "
        "which never answered it (answered: ['b'])",
        ("q3", "a"): "outcome for unknown query 'q3' without its text",
    }
    kinds = {reason_kind(reason) for reason in refused.values()}
    assert kinds == {"unanswered_model", "unknown_query"}


def test_a_scores_time_is_its_producers_held_near_its_record_or_the_records() -> None:
    """The time that orders two scores of one source is the same whichever writer
    reads the record (not the time of decoding), and a wild clock cannot pin a score."""
    skew = timedelta(seconds=60)
    broker = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    for now in (broker, broker + timedelta(days=3)):  # two writers, days apart
        left_out = validate_outcome(raw(quality_score=1.0), SETTINGS)
        assert with_score_time(left_out, broker.timestamp(), skew, now).created_at == broker
        given = broker - timedelta(seconds=30)
        stamped = validate_outcome(raw(quality_score=1.0, created_at=given.isoformat()), SETTINGS)
        assert with_score_time(stamped, broker.timestamp(), skew, now) == stamped
        a_year_ahead = stamped.model_copy(update={"created_at": broker + timedelta(days=365)})
        timed = with_score_time(a_year_ahead, broker.timestamp(), skew, now)
        assert timed.created_at == broker + skew


@pytest.mark.parametrize("stamp_created_at", [False, True])
def test_a_producer_whose_clock_runs_ahead_pins_no_score(stamp_created_at: bool) -> None:
    """On a topic stamped at creation the broker's timestamp is the producer's clock
    too: a day ahead, its score is held at the writer's clock, so a later score
    from a producer with the right time still replaces it."""
    skew = timedelta(seconds=60)
    now = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    ahead = now + timedelta(days=1)
    fields = {"created_at": ahead.isoformat()} if stamp_created_at else {}
    first = validate_outcome(raw(quality_score=0.0, **fields), SETTINGS)
    assert with_score_time(first, ahead.timestamp(), skew, now).created_at == now + skew
    an_hour_later = now + timedelta(hours=1)
    second = validate_outcome(raw(quality_score=1.0), SETTINGS)
    later = with_score_time(second, an_hour_later.timestamp(), skew, an_hour_later)
    assert later.created_at > now + skew


@pytest.mark.parametrize("timestamp", [1.7e15, 1e300, float("inf"), -1.0])
def test_a_record_timestamp_no_datetime_holds_is_the_writers_clock(timestamp: float) -> None:
    """Microseconds given for milliseconds (year 58892) raised ValueError and stopped
    the writer on that record at every restart; -1 is a record without a timestamp."""
    skew = timedelta(seconds=60)
    now = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    outcome = validate_outcome(raw(quality_score=1.0), SETTINGS)
    assert with_score_time(outcome, timestamp, skew, now).created_at == now
    given = now - timedelta(seconds=30)
    stamped = validate_outcome(raw(quality_score=1.0, created_at=given.isoformat()), SETTINGS)
    assert with_score_time(stamped, timestamp, skew, now).created_at == given
