"""An answer's role travels from its assignment to its response, and `final` marks
the one response per query that is the query's answer."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from schemas import Assignment, ModelResponse
from workers.stream.codec import decode
from workers.stream.model_worker import Answer

MOMENT = datetime(2026, 11, 30, tzinfo=UTC)


def assignment(role: str) -> Assignment:
    return Assignment.model_validate(
        {
            "query_id": "q1",
            "text": "What is 2+2?",
            "model": "m",
            "pool": "p",
            "window_id": "w",
            "window_start": MOMENT,
            "window_end": MOMENT,
            "predicted_quality": 0.5,
            "predicted_cost_usd": 0.001,
            "role": role,
        }
    )


@pytest.mark.parametrize(
    ("role", "final"),
    [("answer", True), ("escalation", True), ("probe", False), ("shadow", False)],
)
def test_a_response_is_final_only_for_roles_that_answer_the_query(role: str, final: bool) -> None:
    _, response = Answer(response="4").events(assignment(role), response_chars=100)
    assert response.role == role
    assert response.final is final


def test_a_version_2_response_is_a_final_answer() -> None:
    payload = {
        "schema_version": 2,
        "query_id": "q1",
        "model": "m",
        "pool": "p",
        "response": "4",
    }
    response = decode(json.dumps(payload).encode(), ModelResponse)
    assert response.role == "answer"
    assert response.final is True


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="role"):
        assignment("guess")
