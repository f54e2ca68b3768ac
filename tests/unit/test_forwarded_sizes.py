"""A query the router accepts fits every record it is forwarded in: its prediction,
its assignments, a cascade's probes and, without transactions, its decision entry.
The router's producer refuses a larger record, and the stage that made it would
fail on it at every restart."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schemas import Assignment, PredictedQuery, QueryEvent
from workers.config import Settings
from workers.routing.predictor import Estimates
from workers.routing.probes import probe_metadata
from workers.stream.app import PRODUCER_MAX_REQUEST_BYTES, value_room_bytes
from workers.stream.codec import BadEvent, encode
from workers.stream.decision_log import decided_value
from workers.stream.predict_stage import QueryRules, pool_records
from workers.stream.router_state import predicted_batch

MODELS = ["cheap-a", "cheap-b", "dear"]


def settings_of(models: list[str], panel: int) -> Settings:
    """A one-shot pool "default" and a cascade pool "c" probing with the first
    `panel` models."""
    return Settings(
        router_models=models,
        router_max_text_chars=PRODUCER_MAX_REQUEST_BYTES,
        router_pools={  # type: ignore[dict-item]
            "c": {
                "mode": "budget",
                "window_budget_usd": 1.0,
                "cascade": True,
                "cascade_panel": models[:panel],
            },
        },
    )


SETTINGS = settings_of(MODELS, 2)
# Forty models of 200-character names, probing with four: each probe's context
# carries predictions of 40 models (before, counted once for the four).
WIDE = settings_of([f"{i:03d}" + "m" * 197 for i in range(40)], 4)


def query_of(chars: int, pool: str) -> bytes:
    """A query whose text is `chars` control characters: 6 bytes each as JSON."""
    return json.dumps({"query_id": "q", "text": "\x01" * chars, "pool": pool}).encode()


def accepted(rules: QueryRules, raw: bytes) -> QueryEvent | None:
    try:
        return rules.validate(raw)
    except BadEvent:
        return None


def largest_accepted(rules: QueryRules, pool: str) -> tuple[QueryEvent, int]:
    """The longest such query the rules accept, and its length in characters."""
    low, high = 1, PRODUCER_MAX_REQUEST_BYTES  # accepted, refused
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(rules, query_of(middle, pool)) else (low, middle)
    query = accepted(rules, query_of(low, pool))
    assert query is not None
    return query, low


def predicted(query: QueryEvent, models: list[str]) -> PredictedQuery:
    """Predictions written as long as floats get."""
    n = len(models)
    number = 0.12345678901234568
    return PredictedQuery(
        query=query, models=models, quality=[number] * n, cost_usd=[number] * n,
        support=[number] * n,
    )  # fmt: skip


def assignment(query: QueryEvent, model: str, role: str, metadata: dict[str, object]) -> Assignment:
    return Assignment.model_validate(
        {
            "query_id": query.query_id, "text": query.text, "model": model, "pool": query.pool,
            "window_id": "w" * 200, "window_start": query.created_at,
            "window_end": query.created_at, "predicted_quality": 0.12345678901234568,
            "predicted_cost_usd": 0.12345678901234568, "metadata": metadata, "role": role,
        }
    )  # fmt: skip


def largest_record(query: QueryEvent, settings: Settings, transactions: bool) -> bytes:
    """The largest record the router writes for `query`: an answer (one-shot pool) or
    a probe (cascade pool, its context holding the predicted query); without
    transactions, the decision entry of every assignment of the query (an answer
    and its shadow, or a probe per panel model)."""
    models = settings.router_models
    if query.pool == "c":
        panel = settings.router_pools["c"].cascade_panel or []
        metadata = probe_metadata(query.metadata, predicted(query, models), panel, 3, "f" * 64)
        probes = [assignment(query, m, "probe", metadata) for m in panel]
        return encode(probes[0]) if transactions else decided_value(probes)
    answer = assignment(query, models[-1], "answer", query.metadata)
    shadow = assignment(query, models[0], "shadow", query.metadata)
    return encode(answer) if transactions else decided_value([answer, shadow])


@pytest.mark.parametrize("settings", [SETTINGS, WIDE], ids=["3 models", "40 wide"])
@pytest.mark.parametrize("transactions", [True, False])
@pytest.mark.parametrize("pool", ["default", "c"])
def test_the_largest_query_accepted_fits_its_largest_record(
    pool: str, transactions: bool, settings: Settings
) -> None:
    """Before: a valid query of 100,000 control characters (600 KB) made a cascade's
    probe of 1.2 MB, and without transactions an answer and its shadow made a
    decision entry of 1.2 MB."""
    rules = QueryRules.of(settings, transactions)
    query, chars = largest_accepted(rules, pool)
    record = largest_record(query, settings, transactions)
    assert len(record) <= value_room_bytes(query.query_id.encode())
    # The bound is not needlessly tight: most of a request is the query's.
    copies = rules.largest[pool].queries
    assert copies * 6 * chars > 0.9 * PRODUCER_MAX_REQUEST_BYTES
    with pytest.raises(BadEvent, match="exceed the router's producer request size"):
        rules.validate(query_of(chars + 1, pool))


def test_without_shadows_a_decision_entry_holds_one_answer() -> None:
    """ROUTER_SHADOW_SHARE=0: no shadow, so without transactions a one-shot query's
    decision entry holds its answer alone, and the query may take the whole request."""
    rules = QueryRules.of(SETTINGS.model_copy(update={"router_shadow_share": 0.0}), False)
    assert rules.largest["default"] == (1, 1)
    assert QueryRules.of(SETTINGS, transactions=False).largest["default"] == (2, 1)


def test_a_query_is_measured_as_the_router_writes_it() -> None:
    """1e15 is written 1000000000000000.0: a query of 60,000 of them, 300 KB as sent,
    is 1.14 MB as forwarded. It passed, its prediction could not be sent, and the
    predict stage failed on it at every restart."""
    rules = QueryRules.of(SETTINGS, transactions=True)

    def numbers(count: int) -> bytes:
        values = ",".join(["1e15"] * count)
        return f'{{"query_id":"q","text":"t","metadata":{{"x":[{values}]}}}}'.encode()

    with pytest.raises(BadEvent, match="query of 1140"):
        rules.validate(numbers(60_000))
    query = rules.validate(numbers(40_000))  # 760 KB as forwarded: it fits
    estimates = Estimates(
        np.full((1, 3), 0.5), np.full((1, 3), 0.001), np.zeros((1, 4), np.float32),
        np.zeros((1, 3)),
    )  # fmt: skip
    records = pool_records(predicted_batch(MODELS, [query], estimates), PRODUCER_MAX_REQUEST_BYTES)
    assert [len(value) <= value_room_bytes(key) for key, value in records] == [True]
