"""The codec reads valid events with pydantic's JSON parser and everything else with
json.loads: both paths must give the same event, or both refuse it."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas import Outcome, PredictedQuery, QueryEvent
from workers.stream.codec import BadEvent, decode, decode_via_json_module

CASES = 1000

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["NaN", "1e400", "\ud800", "2026-11-30T10:00:00", "1", "true"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
query_like = st.fixed_dictionaries(
    {},
    optional={
        "query_id": values | st.text(min_size=1, max_size=20),
        "text": values | st.text(min_size=1, max_size=40),
        "pool": st.sampled_from(["default", ""]) | values,
        "created_at": st.datetimes().map(lambda d: d.isoformat()) | values,
        "hints": values
        | st.fixed_dictionaries(
            {},
            optional={
                "max_cost_usd": values,
                "min_quality": values,
                "allowed_models": st.lists(st.sampled_from(["a", "b"])) | values,
            },
        ),
        "metadata": values,
        "schema_version": st.sampled_from([1, 1.0, True, "1", 2]) | values,
    },
)


def as_json(payload: Any) -> bytes:
    """Python's JSON writer, which also writes NaN, Infinity and lone surrogates."""
    return json.dumps(payload, ensure_ascii=len(str(payload)) % 2 == 0).encode(
        "utf-8", "surrogatepass"
    )


def same_either_way(raw: bytes, event_type: type[Any]) -> None:
    try:
        wanted = decode_via_json_module(raw, event_type)
    except BadEvent:
        try:
            got = decode(raw, event_type)
        except BadEvent:
            return
        raise AssertionError(f"{raw!r} accepted as {got!r}, refused by json.loads") from None
    got = decode(raw, event_type)
    # created_at, when the bytes have none, is the moment each path read them.
    assert got.model_dump(exclude={"created_at"}) == wanted.model_dump(exclude={"created_at"})
    if isinstance(got, QueryEvent):
        assert abs(got.created_at - wanted.created_at).total_seconds() < 60


@settings(max_examples=CASES, deadline=None)
@given(query_like.map(as_json))
@example(b'{"query_id": "a", "query_id": "b", "text": "t"}')  # a repeated key
@example(b'\xef\xbb\xbf{"query_id": "a", "text": "t"}')  # a byte order mark
@example(b' {"query_id": "a", "text": "t"}\n')
@example(b'{"query_id": "a", "text": "t"} x')
@example(b'{"query_id": "a", "text": "t", "metadata": {"n": -Infinity}}')
@example(b'{"query_id": "a", "text": "\\ud83d\\ude00 \\udc00"}')
@example(b'{"query_id": "a", "text": "t", "metadata": {"n": ' + b"9" * 5000 + b"}}")
@example(b'{"query_id": "a", "text": "1", "metadata": {"m": 12.5, "n": ' + b"9" * 4301 + b"}}")
@example(b'{"query_id": "a", "text": "' + b"1" * 4299 + b' 2", "metadata": {"n": 12.5}}')
@example(b'{"query_id": "a", "text": "t", "schema_version": true}')
def test_a_query_decodes_the_same_either_way(raw: bytes) -> None:
    same_either_way(raw, QueryEvent)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=2, max_size=2),
    st.sampled_from([PredictedQuery, Outcome]),
)
def test_a_prediction_round_trips_the_same_either_way(numbers: list[float], kind: type) -> None:
    predicted = PredictedQuery(
        query=QueryEvent(query_id="q", text="t"),
        models=["a", "b"],
        quality=numbers,
        cost_usd=numbers,
        support=numbers,
    )
    raw = predicted.model_dump_json().encode()
    same_either_way(raw, kind)
    if kind is PredictedQuery:
        assert decode(raw, PredictedQuery) == predicted
