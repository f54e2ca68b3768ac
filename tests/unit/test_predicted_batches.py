"""One record per pool and micro-batch on omnirouter.predicted: what the predict
stage writes (fitting a produce request) and what the window stage reads back."""

from __future__ import annotations

import json

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from schemas import PredictedBatch, PredictedQuery, QueryEvent
from workers.config import Settings
from workers.stream.app import PRODUCER_MAX_REQUEST_BYTES
from workers.stream.codec import BadEvent, encode
from workers.stream.predict_stage import ASSIGNMENT_ROOM_BYTES, QueryRules, pool_records
from workers.stream.window_stage import read_predictions, records_per_take, windows_of

MODELS = ["small", "large"]


def batch(queries: list[QueryEvent]) -> PredictedBatch:
    rows = [[0.1 * i, 0.2 * i] for i in range(len(queries))]
    return PredictedBatch(models=MODELS, queries=queries, quality=rows, cost_usd=rows, support=rows)


def read_back(records: list[tuple[bytes, bytes]]) -> list[tuple[bytes, str, list[float]]]:
    return [
        (key, p.query.query_id, p.quality)
        for key, value in records
        for p in read_predictions(value)
    ]


def test_each_pool_gets_one_record_of_its_queries_in_order() -> None:
    queries = [
        QueryEvent(query_id=f"q{i}", text="t", pool="gold" if i % 3 == 0 else "default")
        for i in range(7)
    ]
    records = pool_records(batch(queries), PRODUCER_MAX_REQUEST_BYTES)
    assert [key for key, _ in records] == [b"gold", b"default"]
    assert read_back(records) == [
        (b"gold", "q0", [0.0, 0.0]),
        (b"gold", "q3", [pytest.approx(0.3), pytest.approx(0.6)]),
        (b"gold", "q6", [pytest.approx(0.6), pytest.approx(1.2)]),
        *[(b"default", f"q{i}", [pytest.approx(0.1 * i), pytest.approx(0.2 * i)])
          for i in (1, 2, 4, 5)],
    ]  # fmt: skip


def test_each_pool_s_record_keeps_its_queries_uncertainty() -> None:
    """A small store's cluster and mean variances travel with each query's row."""
    queries = [QueryEvent(query_id=f"q{i}", text="t", pool=f"p{i % 2}") for i in range(4)]
    whole = batch(queries).model_copy(
        update={"cluster": [0, 1, 2, 3], "mean_variance": [[i, 10 * i] for i in range(4)]}
    )
    read = [p for _, value in pool_records(whole, PRODUCER_MAX_REQUEST_BYTES)
            for p in read_predictions(value)]  # fmt: skip
    assert [(p.query.query_id, p.cluster, p.mean_variance) for p in read] == [
        ("q0", 0, [0, 0]), ("q2", 2, [2, 20]), ("q1", 1, [1, 10]), ("q3", 3, [3, 30]),
    ]  # fmt: skip


def test_each_pool_s_record_keeps_its_queries_cascade_clusters() -> None:
    """A cascade pool's clusters (and their fit) travel with each query's row."""
    queries = [QueryEvent(query_id=f"q{i}", text="t", pool=f"p{i % 2}") for i in range(4)]
    whole = batch(queries).model_copy(
        update={"cascade_cluster": [5, None, 7, None], "cascade_fit": ["f", None, "f", None]}
    )
    read = [p for _, value in pool_records(whole, PRODUCER_MAX_REQUEST_BYTES)
            for p in read_predictions(value)]  # fmt: skip
    assert [(p.query.query_id, p.cascade_cluster, p.cascade_fit) for p in read] == [
        ("q0", 5, "f"), ("q2", 7, "f"), ("q1", None, None), ("q3", None, None),
    ]  # fmt: skip


def test_a_batch_too_large_for_one_request_is_split_and_each_part_fits() -> None:
    settings = Settings(router_models=MODELS, router_max_text_chars=PRODUCER_MAX_REQUEST_BYTES)
    rules = QueryRules.of(settings, transactions=True)
    # The largest query validation lets through, among small ones.
    room = PRODUCER_MAX_REQUEST_BYTES - rules.prediction_room - ASSIGNMENT_ROOM_BYTES - 300
    largest = json.dumps({"query_id": "big", "text": "x" * room}).encode()
    big = rules.validate(largest)
    queries = [QueryEvent(query_id=f"q{i}", text="t" * 3000) for i in range(5)]
    queries.insert(2, big)
    records = pool_records(batch(queries), PRODUCER_MAX_REQUEST_BYTES)
    assert len(records) > 1
    for key, value in records:  # what aiokafka's producer checks before it sends
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [])
        assert size <= PRODUCER_MAX_REQUEST_BYTES
    assert [query_id for _, query_id, _ in read_back(records)] == [
        "q0", "q1", "big", "q2", "q3", "q4"
    ]  # fmt: skip


def test_a_single_prediction_of_a_router_before_batches_is_still_read() -> None:
    single = PredictedQuery(
        query=QueryEvent(query_id="old", text="t"), models=MODELS,
        quality=[0.5, 0.9], cost_usd=[0.1, 0.2], support=[1.0, 2.0],
    )  # fmt: skip
    assert read_predictions(encode(single)) == [single]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00not a prediction", "not JSON"),
        (b'{"models": ["small"], "queries": []}', "invalid PredictedBatch"),
        (
            b'{"models": ["small"], "queries": [{"query_id": "q", "text": "t"}], '
            b'"quality": [[0.5, 0.6]], "cost_usd": [[0.1]], "support": [[1.0]]}',
            "quality must hold one row per query, one value per model",
        ),
    ],
)
def test_what_is_no_prediction_is_refused_with_the_batch_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(BadEvent, match=reason):
        read_predictions(raw)


def test_a_single_prediction_with_a_value_missing_is_refused() -> None:
    """A router before batches sent one PredictedQuery per record: one whose quality
    lacks a model's value is a dead letter, not an IndexError that stops the
    window stage (read in another model order) or fails its pool's window."""
    short = json.dumps(
        {
            "query": {"query_id": "old", "text": "t"},
            "models": list(reversed(MODELS)),
            "quality": [0.5],
            "cost_usd": [0.1, 0.2],
        }
    ).encode()
    with pytest.raises(BadEvent, match="invalid PredictedBatch"):  # the batch reason
        read_predictions(short)


def test_predictions_are_the_rows_of_the_batch() -> None:
    queries = [QueryEvent(query_id=f"q{i}", text="t") for i in range(3)]
    predicted = batch(queries)
    rows = predicted.predictions()
    expected = [
        PredictedQuery(
            query=q, models=MODELS, quality=predicted.quality[i], cost_usd=predicted.cost_usd[i],
            support=predicted.support[i], predicted_at=predicted.predicted_at,
        )
        for i, q in enumerate(queries)
    ]  # fmt: skip
    assert rows == expected


@pytest.mark.parametrize(
    ("count", "most", "sizes"),
    [(0, 4, []), (3, 4, [3]), (4, 4, [4]), (5, 4, [3, 2]), (2500, 2000, [1250, 1250])],
)
def test_windows_hold_at_most_the_maximum_in_even_parts(
    count: int, most: int, sizes: list[int]
) -> None:
    items = list(range(count))
    windows = windows_of(items, most)  # type: ignore[arg-type]
    assert [len(w) for w in windows] == sizes
    assert [i for w in windows for i in w] == items


@pytest.mark.parametrize(
    ("window_seconds", "max_queries", "predict_batch", "records"),
    [(1.0, 2000, 256, 40), (5.0, 2000, 256, 200), (0.1, 2000, 256, 8), (1.0, 50_000, 100, 500)],
)
def test_a_take_holds_a_window_s_time_of_batches_and_a_full_window(
    window_seconds: float, max_queries: int, predict_batch: int, records: int
) -> None:
    settings = Settings(
        router_window_seconds=window_seconds,
        router_max_window_queries=max_queries,
        router_predict_batch=predict_batch,
    )
    assert records_per_take(settings) == records
