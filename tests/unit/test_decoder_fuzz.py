"""Fuzzing the event decoders: whatever bytes arrive, the answer is a valid event
or BadEvent with a reason (a dead letter), never another exception (a crash)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas import Outcome, QueryEvent
from workers.config import Settings
from workers.stream.codec import BadEvent
from workers.stream.outcomes import validate_outcome
from workers.stream.predict_stage import validate_query

SETTINGS = Settings(router_models=["a", "b"], router_max_text_chars=200)
CASES = 1000

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
# Near-valid queries: the right field names with values of any type, some left out.
query_like = st.fixed_dictionaries(
    {},
    optional={
        "query_id": json_values | st.text(min_size=1, max_size=300),
        "text": json_values | st.text(max_size=400),
        "pool": st.sampled_from(["default", "gold", ""]) | json_values,
        "created_at": st.datetimes().map(lambda d: d.isoformat()) | json_values,
        "hints": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "max_cost_usd": json_values,
                "min_quality": json_values,
                "allowed_models": st.lists(st.sampled_from(["a", "b", "z"])) | json_values,
            },
        ),
        "metadata": json_values,
        "schema_version": json_values,
    },
)
outcome_like = st.fixed_dictionaries(
    {},
    optional={
        "query_id": json_values,
        "model": st.sampled_from(["a", "b", "z"]) | json_values,
        "score": json_values,
        "input_tokens": json_values,
        "output_tokens": json_values,
        "cost_usd": json_values,
        "latency_seconds": json_values,
        "error": json_values,
    },
)


def as_bytes(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def mangled(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid event cut short, or with one byte replaced."""
    cut = st.integers(0, len(valid)).map(lambda n: valid[:n])
    flipped = st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
        lambda at: valid[: at[0]] + bytes([at[1]]) + valid[at[0] + 1 :]
    )
    return cut | flipped


VALID_QUERY = as_bytes({"query_id": "q1", "text": "What is 2 + 2?", "hints": {"min_quality": 0.5}})
VALID_OUTCOME = as_bytes({"query_id": "q1", "model": "a", "score": 1.0, "cost_usd": 0.001})

query_bytes = (
    st.binary(max_size=600)
    | query_like.map(as_bytes)
    | json_values.map(as_bytes)
    | mangled(VALID_QUERY)
)
outcome_bytes = (
    st.binary(max_size=600)
    | outcome_like.map(as_bytes)
    | json_values.map(as_bytes)
    | mangled(VALID_OUTCOME)
)
# Inputs that break naive JSON handling in Python rather than the schema.
HOSTILE = [
    b"[" * 100_000,  # nesting deeper than the recursion limit
    b'{"query_id": "q", "text": "t", "metadata": {"n": '
    + b"9" * 5000
    + b"}}",  # int > 4,300 digits
    b'{"query_id": "q", "text": "t", "hints": {"max_cost_usd": NaN}}',
    b'{"query_id": "q", "text": "t", "hints": {"min_quality": Infinity}}',
    b"\xef\xbb\xbf{}",  # a byte order mark
    b"",
]


def check_query(raw: bytes) -> None:
    try:
        query = validate_query(raw, SETTINGS)
    except BadEvent as exc:
        assert str(exc)  # the dead letter's reason
        return
    assert isinstance(query, QueryEvent)
    assert 0 < len(query.text) <= SETTINGS.router_max_text_chars
    assert query.pool in SETTINGS.known_pools()


def check_outcome(raw: bytes) -> None:
    try:
        outcome = validate_outcome(raw, SETTINGS)
    except BadEvent as exc:
        assert str(exc)
        return
    assert isinstance(outcome, Outcome)
    assert outcome.model in SETTINGS.router_models


@settings(max_examples=CASES, deadline=None)
@given(query_bytes)
@example(HOSTILE[0])
@example(HOSTILE[1])
@example(HOSTILE[2])
@example(HOSTILE[3])
@example(HOSTILE[4])
@example(HOSTILE[5])
def test_any_bytes_on_the_query_topic_decode_or_become_a_dead_letter(raw: bytes) -> None:
    check_query(raw)


@settings(max_examples=CASES, deadline=None)
@given(outcome_bytes)
@example(HOSTILE[0])
@example(HOSTILE[1])
@example(b'{"query_id": "q", "model": "a", "score": NaN}')
def test_any_bytes_on_the_outcome_topic_decode_or_become_a_dead_letter(raw: bytes) -> None:
    check_outcome(raw)


def test_non_finite_numbers_are_refused() -> None:
    for raw in HOSTILE[2:4]:
        try:
            validate_query(raw, SETTINGS)
        except BadEvent:
            continue
        raise AssertionError(f"accepted {raw!r}")
