"""Gathering a cascade query's probe answers (workers/routing/probes.py): ready when
every panel model answered or the deadline passed, errors and missing answers
count as none, and the accepted answer becomes the query's final answer."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas import Assignment, ModelResponse, PredictedQuery, QueryEvent
from workers.routing.probes import (
    CASCADE_METADATA_KEY,
    NO_ANSWER_BEFORE_DEADLINE,
    PendingProbes,
    accepted_metadata,
    add_answer,
    final_response,
    is_complete,
    is_overdue,
    probe_metadata,
    probed_query,
)
from workers.stream.codec import encode

PANEL = ["cheap-a", "cheap-b"]
PREDICTED = PredictedQuery(
    query=QueryEvent(query_id="q1", text="2+2?", pool="p", metadata={"user": 7}),
    models=["cheap-a", "cheap-b", "dear"],
    quality=[0.6, 0.6, 0.9],
    cost_usd=[0.001, 0.001, 0.01],
)


def probe_answer(model: str, response: str | None, error: str | None = None) -> ModelResponse:
    return ModelResponse(
        query_id="q1",
        model=model,
        pool="p",
        response=response,
        error=error,
        metadata=probe_metadata({"user": 7}, PREDICTED, PANEL),
        text="2+2?",
        role="probe",
        final=False,
    )


def test_an_answer_too_large_to_gather_with_the_others_is_no_answer() -> None:
    """Each answer of about 600 KB fits a request alone (the model worker's check);
    gathered, two made a 1.2 MB pending entry and probed query that the router could
    not write, and the gatherer failed on it at every restart."""
    room = 999_000
    pending = add_answer(None, probe_answer("cheap-a", "x" * 600_000), 100.0, 0, room)
    pending = add_answer(pending, probe_answer("cheap-b", "y" * 600_000), 101.0, 0, room)
    assert pending is not None and is_complete(pending)
    probed = probed_query(pending)
    assert len(encode(probed)) <= room and len(pending.model_dump_json()) <= room
    first, second = probed.answers
    assert first.response == "x" * 600_000
    assert second.response is None
    assert second.error == (
        "answer of 600000 characters, too large to gather with the panel's other answers"
    )
    # Answers that fit together are gathered whole.
    small = add_answer(None, probe_answer("cheap-a", "x" * 1000), 100.0, 0, room)
    small = add_answer(small, probe_answer("cheap-b", "y" * 1000), 101.0, 0, room)
    assert small is not None and [a.response for a in probed_query(small).answers] == [
        "x" * 1000, "y" * 1000,
    ]  # fmt: skip


def test_whatever_answers_come_the_gathered_record_fits() -> None:
    """An answer that leaves the record within a few bytes of the room, then a short
    one gathered as the longer too-large error: the record was 47 bytes over."""
    room = 999_742

    def gathered(pending: PendingProbes) -> int:
        return max(len(pending.model_dump_json()), len(encode(probed_query(pending))))

    empty = add_answer(None, probe_answer("cheap-a", ""), 100.0, 0, room)
    assert empty is not None
    base = gathered(empty)
    for first_chars in (room - base - 20, room - base - 300, 500_000):
        first = add_answer(None, probe_answer("cheap-a", "x" * first_chars), 100.0, 0, room)
        assert first is not None and gathered(first) <= room
        for second in ("y" * 70, "y" * 600_000, None):
            error = None if second else "e" * 5000  # a model's long error
            both = add_answer(first, probe_answer("cheap-b", second, error), 101.0, 0, room)
            assert both is not None and is_complete(both) and gathered(both) <= room


def test_the_query_is_ready_once_every_panel_model_answered() -> None:
    pending = add_answer(None, probe_answer("cheap-a", "4"), now=100.0, partition=1)
    assert pending is not None and not is_complete(pending)
    assert pending.partition == 1 and pending.predicted == PREDICTED
    pending = add_answer(pending, probe_answer("cheap-b", "four"), now=101.0)
    assert pending is not None and is_complete(pending)
    probed = probed_query(pending)
    assert [(a.model, a.response) for a in probed.answers] == [
        ("cheap-a", "4"),
        ("cheap-b", "four"),
    ]
    assert probed.predicted == PREDICTED


def test_an_error_is_an_answer_of_none_and_completes_the_panel() -> None:
    pending = add_answer(None, probe_answer("cheap-a", None, error="timeout"), now=0.0)
    pending = add_answer(pending, probe_answer("cheap-b", "4"), now=0.0)
    assert pending is not None and is_complete(pending)
    first = probed_query(pending).answers[0]
    assert (first.response, first.error) == (None, "timeout")


def test_a_missing_answer_counts_as_none_once_the_deadline_passed() -> None:
    pending = add_answer(None, probe_answer("cheap-b", "4"), now=100.0)
    assert pending is not None
    assert not is_overdue(pending, now=129.0, deadline_seconds=30.0)
    assert is_overdue(pending, now=130.0, deadline_seconds=30.0)
    missing = probed_query(pending).answers[0]
    assert (missing.model, missing.response, missing.error) == (
        "cheap-a", None, NO_ANSWER_BEFORE_DEADLINE,
    )  # fmt: skip


def test_an_answer_twice_or_from_outside_the_panel_changes_nothing() -> None:
    pending = add_answer(None, probe_answer("cheap-a", "4"), now=0.0)
    again = add_answer(pending, probe_answer("cheap-a", "4"), now=5.0)
    stranger = add_answer(again, probe_answer("dear", "4"), now=5.0)
    assert stranger is not None and stranger.answers.keys() == {"cheap-a"}
    assert stranger.first_answer_at == 0.0 and not is_complete(stranger)


def test_a_redelivered_answer_as_an_error_keeps_the_answer_in_hand() -> None:
    """cheap-a's "4" delivered again as an error (its worker answered again after a
    crash, the model then rate-limited): the error replaced the answer, and the
    query counted as none of its probes answered. A later answer still replaces
    an earlier error."""
    pending = add_answer(None, probe_answer("cheap-a", "4"), now=0.0)
    pending = add_answer(pending, probe_answer("cheap-a", None, error="429"), now=1.0)
    pending = add_answer(pending, probe_answer("cheap-b", None, error="timeout"), now=2.0)
    assert pending is not None and pending.answers["cheap-a"].response == "4"
    pending = add_answer(pending, probe_answer("cheap-b", "4"), now=3.0)
    assert pending is not None and pending.answers["cheap-b"].response == "4"


def test_an_answer_to_another_pool_s_query_of_the_same_id_is_not_gathered() -> None:
    ours = add_answer(None, probe_answer("cheap-a", "4"), now=0.0)
    theirs = probe_answer("cheap-b", "Paris").model_copy(update={"pool": "other"})
    gathered = add_answer(ours, theirs, now=1.0)
    assert gathered is not None and gathered.answers.keys() == {"cheap-a"}


def test_a_response_without_the_cascade_context_is_not_gathered() -> None:
    plain = probe_answer("cheap-a", "4").model_copy(update={"metadata": {"user": 7}})
    assert add_answer(None, plain, now=0.0) is None
    broken = plain.model_copy(update={"metadata": {CASCADE_METADATA_KEY: {"panel": PANEL}}})
    assert add_answer(None, broken, now=0.0) is None


def test_the_accepted_answer_is_final_with_the_query_s_own_metadata() -> None:
    now = datetime.now(UTC)
    decision = Assignment(
        query_id="q1", text="2+2?", model="cheap-b", pool="p", window_id="w",
        window_start=now, window_end=now, predicted_quality=0.9, predicted_cost_usd=0.0,
        metadata=accepted_metadata(probe_metadata({"user": 7}, PREDICTED, PANEL), "four"),
        role="probe",
    )  # fmt: skip
    final = final_response(decision)
    assert (final.model, final.response, final.role, final.final) == (
        "cheap-b", "four", "probe", True,
    )  # fmt: skip
    assert final.metadata == {"user": 7}


@pytest.mark.parametrize(
    ("carried", "read"),
    [(0.82, 0.82), (1, 1.0), (None, None), (1.5, None), (-0.1, None), ("0.8", None), (True, None)],
)
def test_the_quality_a_probe_asks_of_its_escalation_travels_to_the_probed_query(
    carried: object, read: float | None
) -> None:
    """A quality pool's first stage puts on each probe what its escalation must reach
    (a budget pool's, or an older router's, carry none); a value that is not a
    quality is read as none (the pool's target), never as a wrong need."""
    context = probe_metadata({"user": 7}, PREDICTED, PANEL)
    context[CASCADE_METADATA_KEY]["quality_needed"] = carried
    pending = None
    for model in PANEL:
        response = probe_answer(model, "4").model_copy(update={"metadata": context})
        pending = add_answer(pending, response, now=0.0)
    assert pending is not None and is_complete(pending)
    probed = probed_query(pending)
    assert probed.quality_needed == read
    # Without a need the record stays version 1, which the release before reads.
    assert probed.schema_version == (1 if read is None else 2)
