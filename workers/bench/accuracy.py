"""`omnirouter bench accuracy`: does the live pipeline route as well as the offline evaluation?

The first part of a RouterBench-format file warms the store; the rest is
replayed through Kafka (router, outcome writer, replay model workers as
processes) with a budget per query. The same prompts are then routed offline
by the same predictor and optimiser, in windows of the size the stream formed,
under the same budget per query. Both are scored on the prompts whose
outcome is known for every model.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from schemas import WindowReport
from workers.config import environment_for_workers, load_settings
from workers.db import migrate
from workers.demo import routed_outcomes, workers
from workers.routing.dataset import OutcomeTable
from workers.routing.embedder import make_embedder
from workers.routing.evaluate import predict_split, route_windows
from workers.routing.predictor import KnnSettings
from workers.services import LocalBroker, throwaway_postgres
from workers.stream.kafka_io import read_topic
from workers.stream.replay import produce_queries, query_events, seed_outcomes
from workers.stream.topics import create_topics


@dataclass(frozen=True)
class AccuracyFigures:
    prompts: int
    budget_per_query_usd: float
    mean_window_queries: float
    streamed_accuracy: float
    streamed_cost_usd: float
    offline_accuracy: float
    offline_cost_usd: float


def run(
    table: OutcomeTable,
    data_path: Path,
    warm_prompts: int,
    budget_share_of_dearest: float = 0.35,
    rate_per_second: float = 20.0,
    window_seconds: float = 2.0,
    log_dir: Path = Path(".omnirouter/bench-accuracy"),
) -> AccuracyFigures:
    warm = table.take(list(range(warm_prompts)))
    live = table.take(list(range(warm_prompts, len(table))))
    budget = budget_share_of_dearest * float(np.nanmax(np.nanmean(warm.costs, axis=0)))
    settings = load_settings()
    embedder = make_embedder(settings.router_embedder, Path(settings.embedder_cache_dir))
    run_id = f"acc-{uuid.uuid4().hex[:6]}"
    with LocalBroker() as broker, throwaway_postgres() as database_url:
        migrate.upgrade(database_url)
        asyncio.run(create_topics(settings, broker.bootstrap_servers))
        engine = sa.create_engine(database_url)
        seed_outcomes(engine, warm, embedder)
        env = environment_for_workers(
            {
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                "DATABASE_URL": database_url,
                "ROUTER_MODE": "budget",
                "ROUTER_BUDGET_PER_QUERY_USD": repr(budget),
                "ROUTER_WINDOW_SECONDS": str(window_seconds),
                "ROUTER_REFIT_SECONDS": "3600",
                "ROUTER_REFIT_GROWTH": "0",
                "REPLAY_DATA_PATH": str(data_path),
            }
        )
        queries = query_events(live, run_id)
        with workers(env, log_dir):
            asyncio.run(
                produce_queries(
                    broker.bootstrap_servers,
                    settings.topic_names()["queries"],
                    queries,
                    rate_per_second,
                )
            )
            deadline = time.monotonic() + 600
            while len(routed_outcomes(engine, run_id)) < len(queries):
                if time.monotonic() > deadline:
                    raise TimeoutError("not every replayed query was answered in 10 minutes")
                time.sleep(2)
        rows = routed_outcomes(engine, run_id)
        reports = [
            WindowReport.model_validate_json(r)
            for r in asyncio.run(
                read_topic(broker.bootstrap_servers, settings.topic_names()["windows"])
            )
        ]
    chosen = {int(r.query_id.removeprefix(f"{run_id}-")): live.models.index(r.model) for r in rows}
    scored = np.flatnonzero(~np.isnan(live.scores).any(axis=1))
    streamed = np.array([chosen[int(i)] for i in scored])
    window_size = max(1, round(float(np.mean([w.query_count for w in reports]))))

    estimates, _ = predict_split(
        warm,
        embedder.embed(warm.prompts),
        live,
        embedder.embed(live.prompts),
        embedder,
        KnnSettings(),
    )
    # Every replayed prompt is routed, as in the stream; only the scored ones are scored.
    offline = route_windows(
        estimates.quality, estimates.cost, window_size, "budget", budget, "fast"
    )[scored]
    truth, spent = live.scores[scored], live.costs[scored]
    rows_index = np.arange(len(scored))
    return AccuracyFigures(
        prompts=len(scored),
        budget_per_query_usd=budget,
        mean_window_queries=float(np.mean([w.query_count for w in reports])),
        streamed_accuracy=float(truth[rows_index, streamed].mean()),
        streamed_cost_usd=float(spent[rows_index, streamed].sum()),
        offline_accuracy=float(truth[rows_index, offline].mean()),
        offline_cost_usd=float(spent[rows_index, offline].sum()),
    )
