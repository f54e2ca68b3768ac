"""What the router accepts from omnirouter.queries, and the reasons it gives otherwise."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest

from schemas import Outcome, PredictedBatch, QueryEvent
from workers.config import Settings
from workers.db.repository import unstorable_fields, unstorable_reason
from workers.stream.codec import BadEvent, encode
from workers.stream.predict_stage import validate_query, with_bounded_time

SETTINGS = Settings(
    router_models=["a", "b", "c"],
    router_max_text_chars=50,
    router_pools={"gold": {"mode": "budget", "window_budget_usd": 1.0, "models": ["a", "b"]}},  # type: ignore[dict-item]
)


def raw(**fields: object) -> bytes:
    return json.dumps({"query_id": "q1", "text": "hello", **fields}).encode()


def test_a_valid_query_passes_with_its_defaults() -> None:
    query = validate_query(raw(), SETTINGS)
    assert (query.query_id, query.pool, query.hints) == ("q1", "default", None)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"query_id": "q1", "te', "not JSON"),
        (b"\xc3\x28", "invalid UTF-8 at byte 0"),
        (b"[1, 2]", "not a JSON object but list"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"query_id": "q1", "text": "t", "hints": {"max_cost_usd": NaN}}', "NaN is not a number"),
        (raw(text=""), "text: String should have at least 1 character"),
        (raw(text=7), "text: Input should be a valid string"),
        (raw(surprise=1), "surprise: Extra inputs are not permitted"),
        (raw(text="x" * 51), "more than ROUTER_MAX_TEXT_CHARS=50"),
        (raw(pool="silver"), "unknown pool 'silver'"),
        (raw(pool="gold", hints={"allowed_models": ["c"]}), "names none of pool 'gold'"),
        (raw(schema_version=2), "schema_version: Input should be 1"),
    ],
)
def test_bad_queries_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BadEvent, match=reason):
        validate_query(payload, SETTINGS)


def test_a_megabyte_of_text_is_refused_at_the_default_limit() -> None:
    with pytest.raises(BadEvent, match="more than ROUTER_MAX_TEXT_CHARS=100000"):
        validate_query(raw(text="x" * 1_000_000), Settings())


def test_a_query_id_in_the_escalation_keys_is_refused() -> None:
    """The escalation decision of query "abc" is kept under "escalation:abc": a query
    of that id shared its key, and whichever came second was skipped as a duplicate
    (one of the two queries got no final answer)."""
    with pytest.raises(BadEvent, match="reserves for its escalation decisions"):
        validate_query(raw(query_id="escalation:abc"), SETTINGS)
    assert validate_query(raw(query_id="abc:escalation:"), SETTINGS).query_id == "abc:escalation:"


def test_a_reason_never_repeats_the_content() -> None:
    secret = "sk-live-123456"
    with pytest.raises(BadEvent) as caught:
        validate_query(raw(text=secret * 10), SETTINGS)
    assert secret not in str(caught.value)


def test_a_query_too_large_to_forward_is_refused_though_its_text_is_short() -> None:
    # A short text with a megabyte of metadata: the prediction the router would send
    # on could not leave its producer, and the whole batch would fail with it.
    payload = raw(metadata={"blob": "x" * 1_000_000})
    with pytest.raises(BadEvent, match="exceed the router's producer request size"):
        validate_query(payload, SETTINGS)
    assert validate_query(raw(metadata={"blob": "x" * 100_000}), SETTINGS).metadata


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"text": "a\u0000b"}, r"text \(query_text column\): holds a NUL character"),
        ({"query_id": "q\u0000"}, r"query_id \(query_id column\): holds a NUL character"),
        ({"pool": "gold\u0000"}, r"pool \(pool column\): holds a NUL character"),
    ],
)
def test_a_query_whose_outcome_the_database_cannot_store_is_refused(
    fields: dict[str, object], reason: str
) -> None:
    """Refused by the router, not routed and answered with an outcome refused later;
    the reason is the outcome writer's (one check: repository.unstorable_fields)."""
    with pytest.raises(BadEvent, match=f"query whose outcome the database cannot store: {reason}"):
        validate_query(raw(**fields), SETTINGS)
    outcome = Outcome(**{"query_id": "q1", "model": "a", "text": "hello", **fields})  # type: ignore[arg-type]
    assert re.match(reason, unstorable_reason(outcome) or "")


@pytest.mark.parametrize("field", ["query_id", "text", "pool"])
def test_a_lone_surrogate_is_refused(field: str) -> None:
    """No UTF-8 for it: its outcome could not be stored either."""
    with pytest.raises(BadEvent, match=field):
        validate_query(raw(**{field: "a\ud800b"}), SETTINGS)
    assert unstorable_fields({field: "a\ud800b"}) is not None


@pytest.mark.parametrize(
    "fields",
    [
        {"metadata": {"note": "a\ud800b"}},
        {"hints": {"allowed_models": ["a", "b\ud800"]}},
        {"metadata": {"note": "a\ud800b", "blob": "x" * 300_000}},  # measured as written
    ],
)
def test_a_lone_surrogate_anywhere_is_refused(fields: dict[str, object]) -> None:
    """json.loads reads a lone surrogate into metadata and hints (fields without a
    length limit): the query passed, and the predict stage failed writing its
    prediction (PydanticSerializationError) at every restart."""
    settings = Settings(router_models=["a", "b"], router_max_text_chars=1_000_000)
    with pytest.raises(BadEvent, match="lone surrogate"):
        validate_query(raw(**fields), settings)
    pair = validate_query(raw(metadata={"emoji": "\U0001f600"}), settings)  # a whole pair
    assert pair.metadata == {"emoji": "\U0001f600"}


@pytest.mark.parametrize("timestamp", [1.7e15, 1e300, float("inf"), -1.0])
def test_a_query_whose_record_timestamp_no_datetime_holds_is_timed_by_the_router(
    timestamp: float,
) -> None:
    """Microseconds given for milliseconds (year 58892) raised ValueError and stopped
    the predict stage on that record, at every restart; -1 is no timestamp. The
    query keeps its `created_at` within the skew of the router's clock instead."""
    skew, now = timedelta(seconds=60), datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    record = cast(Any, SimpleNamespace(message=SimpleNamespace(timestamp=timestamp)))
    an_hour_before = QueryEvent(query_id="q", text="t", created_at=now - timedelta(hours=1))
    assert with_bounded_time(record, an_hour_before, skew, now).created_at == now - skew
    on_time = QueryEvent(query_id="q", text="t", created_at=now - timedelta(seconds=5))
    assert with_bounded_time(record, on_time, skew, now) == on_time


def nested_query(depth: int) -> bytes:
    """A query whose metadata holds objects `depth` deep."""
    return (
        b'{"query_id": "q", "text": "hi", "metadata": {"x": '
        + b'{"a": ' * depth + b"1" + b"}" * depth + b"}}"
    )  # fmt: skip


@pytest.mark.parametrize("depth", [300, 900])
def test_metadata_nested_deeper_than_its_records_can_be_written_is_refused(depth: int) -> None:
    """json.loads (the path of an event pydantic's parser refuses) read it, and the
    prediction could not be written (pydantic writes 255 levels): the predict stage
    failed on it at every restart."""
    with pytest.raises(BadEvent, match="nested more than"):
        validate_query(nested_query(depth), SETTINGS)


def test_metadata_as_deep_as_allowed_is_forwarded_and_read_back() -> None:
    query = validate_query(nested_query(180), SETTINGS)
    models = SETTINGS.router_models
    batch = PredictedBatch(
        models=models, queries=[query], quality=[[0.5] * len(models)],
        cost_usd=[[0.1] * len(models)], support=[[0.0] * len(models)],
    )  # fmt: skip
    assert PredictedBatch.model_validate_json(encode(batch)).queries[0] == query
