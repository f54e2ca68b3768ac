"""What of a model's answer its outcome keeps (OUTCOME_RESPONSE_MAX_CHARS)."""

from __future__ import annotations

from schemas import Assignment, ModelResponse, Outcome
from workers.db.repository import unstorable_reason
from workers.stream.app import PRODUCER_MAX_REQUEST_BYTES, value_room_bytes
from workers.stream.codec import decode, encode
from workers.stream.model_worker import Answer, response_excerpt


def test_a_short_answer_is_kept_whole_and_none_stays_none() -> None:
    assert response_excerpt("The answer is 42.", 2000) == "The answer is 42."
    assert response_excerpt(None, 2000) is None
    assert response_excerpt("", 2000) is None
    assert response_excerpt("anything", 0) is None  # storing answers turned off


def test_a_long_answer_keeps_its_beginning_and_most_of_its_end() -> None:
    reasoning = "step. " * 1000
    answer = "Question restated. " + reasoning + "Final answer: (C)"
    excerpt = response_excerpt(answer, 400)
    assert excerpt is not None and len(excerpt) == 400
    assert excerpt.startswith("Question restated.")
    assert excerpt.endswith("Final answer: (C)")  # where final answers stand
    head, tail = excerpt.split("\u2026")
    assert len(tail) > 2 * len(head)


def test_the_outcome_carries_the_excerpt_and_the_response_the_whole_answer() -> None:
    assignment = Assignment(
        query_id="q", text="t", model="m", pool="default", window_id="w",
        window_start="2026-01-01T00:00:00Z", window_end="2026-01-01T00:00:01Z",
        predicted_quality=0.5, predicted_cost_usd=0.1,
    )  # fmt: skip
    answer = Answer(response="x" * 100 + "END")
    outcome, response = answer.events(assignment, response_chars=20)
    assert outcome.response is not None and len(outcome.response) == 20
    assert outcome.response.endswith("END")
    assert response.response == "x" * 100 + "END"


def test_an_answer_with_characters_the_database_refuses_still_gets_its_outcome_stored() -> None:
    """A NUL or a lone surrogate in a model's answer used to make its outcome, usage
    and all, a dead letter (the writer refuses what PostgreSQL would refuse), and a
    lone surrogate stopped the worker: its events could not be encoded."""
    assignment = Assignment(
        query_id="q", text="t", model="m", pool="default", window_id="w",
        window_start="2026-01-01T00:00:00Z", window_end="2026-01-01T00:00:01Z",
        predicted_quality=0.5, predicted_cost_usd=0.1,
    )  # fmt: skip
    answer = Answer(response="A\x00B \ud800 final: (C)", cost_usd=0.01)
    outcome, response = answer.events(assignment, response_chars=2000)
    assert outcome.response == "A\ufffdB \ufffd final: (C)"
    assert unstorable_reason(outcome) is None
    # The response keeps the NUL (JSON carries it); a lone surrogate, which UTF-8
    # cannot encode, would have made the response unpublishable.
    assert response.response == "A\x00B \ufffd final: (C)"
    assert decode(encode(response), ModelResponse).response == response.response
    assert decode(encode(outcome), Outcome).response == outcome.response


def test_an_answer_too_large_for_a_produce_request_is_an_error_with_its_usage() -> None:
    """A response record above the producer's request size could not be published:
    the worker stopped with the batch, and stopped again at every restart
    (test_openai_worker.py shows it end to end)."""
    assignment = Assignment(
        query_id="q", text="t", model="m", pool="default", window_id="w",
        window_start="2026-01-01T00:00:00Z", window_end="2026-01-01T00:00:01Z",
        predicted_quality=0.5, predicted_cost_usd=0.1,
    )  # fmt: skip
    answer = Answer(response="x" * PRODUCER_MAX_REQUEST_BYTES, output_tokens=250_000, cost_usd=2.5)
    outcome, response = answer.events(assignment, response_chars=2000)
    assert len(encode(response)) < PRODUCER_MAX_REQUEST_BYTES
    assert response.response is None and response.error == outcome.error
    assert (
        outcome.error == f"answer of {PRODUCER_MAX_REQUEST_BYTES} characters, too large to publish"
    )
    assert (outcome.output_tokens, outcome.cost_usd) == (250_000, 2.5)
    # An answer that fits is published whole, as before.
    fitting = Answer(response="x" * 900_000)
    assert fitting.events(assignment, 2000)[1].response == fitting.response


def test_an_answer_whose_outcome_would_not_fit_is_an_error_too() -> None:
    """The outcome holds the query's text and an excerpt of the answer, and more
    fields than the response: with a long excerpt (OUTCOME_RESPONSE_MAX_CHARS) and
    no metadata it can be the larger. Only the response was checked, and the
    outcome failed to publish with the batch, at every restart."""
    answer = Answer(response="y" * 10_000, output_tokens=3, cost_usd=0.25, latency_ms=1234.5)

    def events(text_chars: int) -> tuple[Outcome, ModelResponse]:
        assignment = Assignment(
            query_id="q", text="t" * text_chars, model="m", pool="default", window_id="w",
            window_start="2026-01-01T00:00:00Z", window_end="2026-01-01T00:00:01Z",
            predicted_quality=0.5, predicted_cost_usd=0.1,
        )  # fmt: skip
        return answer.events(assignment, response_chars=10_000)

    room = value_room_bytes(b"q")
    outcome, response = events(1)
    # A text that leaves the response 50 bytes of room and the outcome none.
    text_chars = room - len(encode(response)) - 50
    outcome, response = events(text_chars)
    assert len(encode(outcome)) <= room and len(encode(response)) <= room
    assert outcome.error == "answer of 10000 characters, too large to publish"
