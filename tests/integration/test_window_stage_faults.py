"""The window stage on a real broker, fed what used to lose a whole batch: bytes on
omnirouter.predicted that are no prediction, and predictions made for an older
model list (the README's "adding a model": a router restarted with one more
model reads what its predecessor predicted). Before, either raised inside the
agent, Faust's `take_events` acknowledged the batch anyway, and every valid
query read with it was never routed. Records of single predictions (routers
before batches) and of batches (PredictedBatch) are read alike; one query of a
batch the router cannot route is its own dead letter, and a batch larger than
ROUTER_MAX_WINDOW_QUERIES falls into several windows.
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import pytest

from schemas import DeadLetter, PredictedBatch, PredictedQuery, QueryEvent, QueryHints
from tests.faults import decisions, start_worker, wait_until
from workers.config import Settings
from workers.services import LocalBroker
from workers.stream.kafka_io import produce_values, read_topic
from workers.stream.topics import create_topics

pytestmark = pytest.mark.integration

MODELS = ["small", "large"]
NEW_MODELS = ["small", "large", "newcomer"]


def prediction(query_id: str, models: list[str]) -> PredictedQuery:
    return PredictedQuery(
        query=QueryEvent(query_id=query_id, text=f"question {query_id}"),
        models=models,
        quality=[0.6, 0.9, 0.95][: len(models)],
        cost_usd=[0.001, 0.01, 0.02][: len(models)],
        support=[5.0] * len(models),
    )


def batch_of(queries: list[QueryEvent], models: list[str]) -> PredictedBatch:
    rows = [[0.6, 0.9, 0.95][: len(models)]] * len(queries)
    costs = [[0.001, 0.01, 0.02][: len(models)]] * len(queries)
    support = [[5.0] * len(models)] * len(queries)
    return PredictedBatch(
        models=models, queries=queries, quality=rows, cost_usd=costs, support=support
    )


def test_bad_and_outdated_predictions_never_cost_a_valid_query(tmp_path: Path) -> None:
    settings = Settings(kafka_partitions=1, router_models=NEW_MODELS)
    names = settings.topic_names()
    routes = [names[f"route:{m}"] for m in NEW_MODELS]
    old = [prediction(f"old-{i}", MODELS) for i in range(10)]  # before "newcomer" was added
    new = [prediction(f"new-{i}", NEW_MODELS) for i in range(10)]
    no_model_left = prediction("gone", ["retired"])
    messages: list[tuple[str, str | bytes]] = [
        ("default", p.model_dump_json()) for p in [*old[:5], *new[:5]]
    ]
    messages += [("default", b"\x00not a prediction"), ("default", no_model_left.model_dump_json())]
    messages += [("default", p.model_dump_json()) for p in [*old[5:], *new[5:]]]
    # A batch of 10 routable queries and one that allows only a model no longer routed.
    batched = [QueryEvent(query_id=f"batch-{i}", text=f"question {i}") for i in range(10)]
    retired = QueryEvent(query_id="batch-gone", text="q", hints=QueryHints(allowed_models=["x"]))
    messages.append(
        ("default", batch_of([*batched[:5], retired, *batched[5:]], MODELS).model_dump_json())
    )

    with LocalBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(create_topics(settings, bootstrap))
        asyncio.run(produce_values(bootstrap, names["predicted"], messages))
        env = {
            **os.environ,
            "ROUTER_SHADOW_SHARE": "0",  # one answer a query (shadows: test_learning_loop)
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DATABASE_URL": "",
            "KAFKA_PARTITIONS": "1",
            "ROUTER_MODELS": '["small", "large", "newcomer"]',
            "ROUTER_MODE": "quality",
            "ROUTER_QUALITY_TARGET": "0.7",
            "ROUTER_WINDOW_SECONDS": "0.5",
            "ROUTER_MAX_WINDOW_QUERIES": "4",
            "METRICS_PORT": "0",
        }
        log = tmp_path / "router.log"
        router = start_worker("router", env, log)
        try:
            wanted = {p.query.query_id for p in [*old, *new]} | {q.query_id for q in batched}

            def routed() -> set[str]:
                assert router.poll() is None, log.read_text(errors="replace")[-3000:]
                return set(decisions(bootstrap, routes))

            wait_until(lambda: routed() >= wanted, 120, "every valid prediction routed")
            letters = [
                DeadLetter.model_validate_json(v)
                for v in asyncio.run(read_topic(bootstrap, names["deadletter"]))
            ]
            final = decisions(bootstrap, routes)
        finally:
            router.terminate()
            router.wait(timeout=60)

    assert set(final) == wanted  # "gone" is not routed: no model of its prediction is left
    assert all(model != "newcomer" for q in old for model, _ in final[q.query.query_id])
    assert all(model != "newcomer" for q in batched for model, _ in final[q.query_id])
    # At most 4 queries a window: the batch's 10 routable queries in 3 or more windows.
    windows = [window for decided in final.values() for _, window in decided]
    assert max(windows.count(w) for w in windows) <= 4
    assert len({window for q in batched for _, window in final[q.query_id]}) >= 3
    reasons = sorted(letter.reason for letter in letters)
    assert len(reasons) == 3, reasons
    assert sum("none of which this router routes to" in r for r in reasons) == 2, reasons
    assert any(r.startswith(("not JSON", "invalid UTF-8")) for r in reasons), reasons
    # The batch's unroutable query is a letter of its own prediction, at the batch's offset.
    (gone,) = [letter for letter in letters if letter.source_offset == len(messages) - 1]
    letter_body = PredictedQuery.model_validate_json(base64.b64decode(gone.raw_base64))
    assert letter_body.query.query_id == "batch-gone"
