"""`omnirouter bench cold-start`: does the router learn on traffic it has no scores for?

An empty store, replay model workers that answer without a score (as real
models do), and the replay judge scoring a share of the answers with some
labels flipped: the only quality the router ever learns is the judge's. N
queries of a RouterBench-format file stream through Kafka in budget mode at a
budget per query worth a share of the dearest model's mean cost; the models'
list prices are what the user tells the router (fitted here from the file's
recorded costs by workers/routing/prices.py), since with nothing stored
prices are all it can go by.

Per block of queries, in production order, it reports the routed accuracy
(from the recorded scores, never the judge's), the cost, the exploration
spend and the scored outcomes stored so far, beside:
- the warm-started router: the same predictor and optimiser knowing every
  outcome of the file but the query's own (5-fold cross-fitting, routed
  offline in windows of the stream's mean size at the same budget; a store
  holding the query's own outcome would be an oracle, not a warm start);
- the best single model at the same cost (the models' hull within the block).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from schemas import Assignment, PredictedBatch, WindowReport
from workers.config import ModelPrice, Settings, environment_for_workers, load_settings
from workers.db import migrate
from workers.db.models import OutcomeRow
from workers.demo import routed_outcomes, workers
from workers.routing import evaluate
from workers.routing.dataset import OutcomeTable
from workers.routing.embedder import Embedder
from workers.routing.predictor import HybridPredictor, KnnSettings
from workers.routing.prices import fitted_prices
from workers.routing.store import RetrievalStore
from workers.services import LocalBroker, throwaway_postgres
from workers.stream.kafka_io import read_topic
from workers.stream.replay import produce_queries, query_events
from workers.stream.topics import create_topics

TIE_TOLERANCE = Settings.model_fields["router_tie_tolerance"].default
# The stream's pace: queries per second and window length (seconds). The router
# refits as a user's would: ROUTER_REFIT_SECONDS and ROUTER_REFIT_GROWTH's defaults.
RATE_PER_SECOND = 10.0
WINDOW_SECONDS = 2.0
BUDGET_SHARE_OF_DEAREST = 0.35


def traffic(
    table: OutcomeTable, queries: int, seed: int, budget_share_of_dearest: float
) -> tuple[OutcomeTable, OutcomeTable, float]:
    """The file in a seeded random order (real traffic mixes tasks; the file lists
    them one after another), its first `queries` rows as the live traffic, and the
    budget per query: a share of the dearest model's mean cost."""
    order = np.random.default_rng(seed).permutation(len(table))
    shuffled = table.take(order)
    live = shuffled.take(list(range(min(queries, len(shuffled)))))
    budget = budget_share_of_dearest * float(np.nanmax(np.nanmean(shuffled.costs, axis=0)))
    return shuffled, live, budget


@dataclass(frozen=True)
class Block:
    """One block of queries, in production order."""

    first: int
    queries: int
    accuracy: float
    cost_usd: float
    exploration_spend_usd: float
    shadow_spend_usd: float  # included in cost_usd: shadow answers are paid for
    shadow_queries: int
    scored_so_far: int
    warm_accuracy: float
    warm_cost_usd: float
    best_single_accuracy: float
    share_per_model: dict[str, float]
    predicted_cost_usd: float  # what the router expected to spend on the block
    # What the router believed of each model on the block's queries (mean predicted
    # quality), beside each model's real accuracy there.
    believed: dict[str, float]
    actual: dict[str, float]


@dataclass(frozen=True)
class ColdStartFigures:
    budget_per_query_usd: float
    exploration_share: float
    shadow_share: float
    priors_alone_share: dict[str, float]  # each model's share of block 1 on the priors alone
    blocks: list[Block]
    windows: int
    judge_spend_usd: float
    # Budget the windows gave up to repay realised spend over predicted
    # (ROUTER_SPEND_CORRECTION; the "budget $" column is the nominal budget).
    spend_correction_usd: float = 0.0

    @property
    def budget_per_block(self) -> list[float]:
        return [self.budget_per_query_usd * b.queries for b in self.blocks]


def run(
    table: OutcomeTable,
    data_path: Path,
    embedder: Embedder,
    queries: int = 2000,
    judge_share: float = 0.2,
    judge_flip: float = 0.1,
    budget_share_of_dearest: float = BUDGET_SHARE_OF_DEAREST,
    rate_per_second: float = RATE_PER_SECOND,
    window_seconds: float = WINDOW_SECONDS,
    block_size: int = 250,
    seed: int = 0,
    log_dir: Path = Path(".omnirouter/bench-cold-start"),
    progress: Callable[[str], None] = lambda _: None,
) -> ColdStartFigures:
    table, live, budget = traffic(table, queries, seed, budget_share_of_dearest)
    settings = load_settings()
    prices = fitted_prices(table)
    run_id = f"cold-{uuid.uuid4().hex[:6]}"
    with LocalBroker() as broker, throwaway_postgres() as database_url:
        migrate.upgrade(database_url)
        asyncio.run(create_topics(settings, broker.bootstrap_servers))
        engine = sa.create_engine(database_url)
        env = environment_for_workers(
            {
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                "DATABASE_URL": database_url,
                "ROUTER_MODE": "budget",
                "ROUTER_BUDGET_PER_QUERY_USD": repr(budget),
                "ROUTER_MODEL_PRICES": _prices_json(prices),
                "ROUTER_WINDOW_SECONDS": str(window_seconds),
                "ROUTER_STORE_REFRESH_SECONDS": "1",
                "REPLAY_DATA_PATH": str(data_path),
                "REPLAY_SCORES": "false",
                "JUDGE_SAMPLE_SHARE": repr(judge_share),
                "JUDGE_FLIP_SHARE": repr(judge_flip),
            }
        )
        events = query_events(live, run_id)
        with workers(env, log_dir, judge=True):
            progress(f"streaming {len(events)} queries at {rate_per_second:.0f}/s ...")
            asyncio.run(
                produce_queries(
                    broker.bootstrap_servers,
                    settings.topic_names()["queries"],
                    events,
                    rate_per_second,
                    progress=lambda n: progress(f"produced {n}") if n % 500 == 0 else None,
                )
            )
            _wait_for_answers(engine, run_id, len(events), timeout_seconds=600)
        assignments, shadow_list = _read_assignments(broker.bootstrap_servers, settings)
        predicted = [
            prediction
            for raw in asyncio.run(
                read_topic(broker.bootstrap_servers, settings.topic_names()["predicted"])
            )
            for prediction in PredictedBatch.model_validate_json(raw).predictions()
        ]
        reports = [
            WindowReport.model_validate_json(raw)
            for raw in asyncio.run(
                read_topic(broker.bootstrap_servers, settings.topic_names()["windows"])
            )
        ]
        scored_at = _scored_query_rows(engine, run_id)
        judge_spend = _judge_spend(engine, run_id)
        _write_stored_scores(log_dir / "scores.jsonl", engine, run_id, live)
    chosen = {int(a.query_id.removeprefix(f"{run_id}-")): a for a in assignments}
    shadows = {int(a.query_id.removeprefix(f"{run_id}-")): a for a in shadow_list}
    beliefs = {int(p.query.query_id.removeprefix(f"{run_id}-")): p.quality for p in predicted}
    window_size = max(1, round(float(np.mean([w.query_count for w in reports]))))
    progress("routing the warm-started reference offline ...")
    warm_plan = warm_reference(table, live, embedder, budget, window_size)
    blocks = _blocks(live, chosen, shadows, beliefs, warm_plan, scored_at, block_size)
    _write_decisions(log_dir / "decisions.jsonl", live, chosen, shadows)
    _write_reports(log_dir / "windows.jsonl", reports)
    return ColdStartFigures(
        budget_per_query_usd=budget,
        exploration_share=settings.router_exploration_share,
        shadow_share=settings.router_shadow_share,
        priors_alone_share=_priors_alone_share(
            live, embedder, prices, budget, block_size, window_size
        ),
        blocks=blocks,
        windows=len(reports),
        judge_spend_usd=judge_spend,
        spend_correction_usd=sum(r.spend_correction_usd for r in reports),
    )


def _write_decisions(
    path: Path, live: OutcomeTable, chosen: dict[int, Assignment], shadows: dict[int, Assignment]
) -> None:
    """Each query's decision beside what it really cost and scored, for a closer look."""
    with path.open("w") as out:
        for i, assignment in sorted(chosen.items()):
            j = live.models.index(assignment.model)
            row = {
                "query": i,
                "task": live.eval_names[i],
                "model": assignment.model,
                "exploration": assignment.exploration,
                "predicted_quality": assignment.predicted_quality,
                "predicted_cost_usd": assignment.predicted_cost_usd,
                "cost_usd": float(np.nan_to_num(live.costs[i, j])),
                "score": None if np.isnan(live.scores[i, j]) else float(live.scores[i, j]),
                "shadow": shadows[i].model if i in shadows else None,
            }
            out.write(json.dumps(row) + "\n")


def _write_stored_scores(path: Path, engine: sa.Engine, run_id: str, live: OutcomeTable) -> None:
    """Each stored score (the judge's, with its flips) beside the recorded one, in
    the order stored: what the router learnt from, for a closer look."""
    with Session(engine) as session, path.open("w") as out:
        rows = session.scalars(
            sa.select(OutcomeRow)
            .where(OutcomeRow.query_id.like(f"{run_id}-%"), OutcomeRow.quality_score.is_not(None))
            .order_by(OutcomeRow.id)
        )
        for row in rows:
            i = int(row.query_id.removeprefix(f"{run_id}-"))
            recorded = live.scores[i, live.models.index(row.model)]
            stored = {
                "query": i,
                "model": row.model,
                "score": row.quality_score,
                "source": row.score_source,
                "recorded_score": None if np.isnan(recorded) else float(recorded),
            }
            out.write(json.dumps(stored) + "\n")


def _write_reports(path: Path, reports: list[WindowReport]) -> None:
    """The windows' reports, in the order they were published, for a closer look."""
    with path.open("w") as out:
        out.writelines(report.model_dump_json() + "\n" for report in reports)


def _prices_json(prices: dict[str, ModelPrice]) -> str:
    return json.dumps({m: p.model_dump() for m, p in prices.items()})


def _wait_for_answers(
    engine: sa.Engine, run_id: str, expected: int, timeout_seconds: float
) -> None:
    deadline = time.monotonic() + timeout_seconds
    while len({r.query_id for r in routed_outcomes(engine, run_id)}) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every query was answered in {timeout_seconds:.0f}s")
        time.sleep(1)


def _read_assignments(
    bootstrap: str, settings: Settings
) -> tuple[list[Assignment], list[Assignment]]:
    """The queries' answers and their shadow answers."""
    names = settings.topic_names()
    found: dict[str, Assignment] = {}
    shadows: dict[str, Assignment] = {}
    for model in settings.router_models:
        for raw in asyncio.run(read_topic(bootstrap, names[f"route:{model}"])):
            assignment = Assignment.model_validate_json(raw)
            kept = shadows if assignment.role == "shadow" else found
            kept[assignment.query_id] = assignment
    return list(found.values()), list(shadows.values())


def _scored_query_rows(engine: sa.Engine, run_id: str) -> NDArray[np.int64]:
    """The production index of each stored scored outcome's query."""
    with Session(engine) as session:
        ids = session.scalars(
            sa.select(OutcomeRow.query_id).where(
                OutcomeRow.query_id.like(f"{run_id}-%"), OutcomeRow.quality_score.is_not(None)
            )
        )
        return np.array([int(i.removeprefix(f"{run_id}-")) for i in ids], dtype=np.int64)


def _judge_spend(engine: sa.Engine, run_id: str) -> float:
    with Session(engine) as session:
        total = session.scalar(
            sa.select(sa.func.sum(OutcomeRow.judge_cost_usd)).where(
                OutcomeRow.query_id.like(f"{run_id}-%")
            )
        )
    return float(total or 0.0)


def warm_reference(
    table: OutcomeTable, live: OutcomeTable, embedder: Embedder, budget: float, window_size: int
) -> NDArray[np.int64]:
    """The model chosen for each live query by a router that knows every outcome of
    the file but the query's own fold (5-fold cross-fitting)."""
    vectors = embedder.embed(table.prompts)
    folds = evaluate.group_folds(table.sample_ids, 5, seed=0)
    quality = np.zeros(table.scores.shape)
    cost = np.zeros(table.scores.shape)
    for fold in range(5):
        fit, held = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        estimates, _ = evaluate.predict_split(
            table.take(fit), vectors[fit], table.take(held), vectors[held], embedder, KnnSettings()
        )
        quality[held], cost[held] = estimates.quality, estimates.cost
    n = len(live)
    return evaluate.route_windows(
        quality[:n], cost[:n], window_size, "budget", budget, "fast", TIE_TOLERANCE
    )


def _priors_alone_share(
    live: OutcomeTable,
    embedder: Embedder,
    prices: dict[str, ModelPrice],
    budget: float,
    block_size: int,
    window_size: int,
) -> dict[str, float]:
    """Each model's share of the first block when routed by a predictor with an
    empty store: the priors and the prices alone."""
    prompts = live.prompts[:block_size]
    empty = RetrievalStore(live.models, embedder.dimension)
    estimates = HybridPredictor(embedder, empty, prices=prices).predict(prompts)
    plan = evaluate.route_windows(
        estimates.quality, estimates.cost, window_size, "budget", budget, "fast", TIE_TOLERANCE
    )
    counts = np.bincount(plan, minlength=len(live.models)) / len(prompts)
    return {m: float(c) for m, c in zip(live.models, counts, strict=True) if c}


def _blocks(
    live: OutcomeTable,
    chosen: dict[int, Assignment],
    shadows: dict[int, Assignment],
    beliefs: dict[int, list[float]],
    warm_plan: NDArray[np.int64],
    scored_at: NDArray[np.int64],
    block_size: int,
) -> list[Block]:
    return [
        _block(
            live,
            rows,
            chosen,
            shadows,
            beliefs,
            warm_plan[rows],
            int((scored_at <= rows[-1]).sum()),
        )
        for first in range(0, len(live), block_size)
        if (rows := np.arange(first, min(first + block_size, len(live)))).size
    ]


def _block(
    live: OutcomeTable,
    rows: NDArray[np.int64],
    chosen: dict[int, Assignment],
    shadows: dict[int, Assignment],
    beliefs: dict[int, list[float]],
    warm: NDArray[np.int64],
    scored_so_far: int,
) -> Block:
    """One block's figures from the recorded outcomes of the models chosen; the cost
    includes the block's shadow answers."""
    models = live.models
    assignments = [chosen[int(i)] for i in rows]
    picked = np.array([models.index(a.model) for a in assignments])
    explored = np.array([a.exploration for a in assignments])
    scores, costs = live.scores[rows], np.nan_to_num(live.costs[rows])
    index = np.arange(len(rows))
    scored = ~np.isnan(scores).any(axis=1)
    shadowed = [(k, live.models.index(shadows[int(i)].model)) for k, i in enumerate(rows)
                if int(i) in shadows]  # fmt: skip
    shadow_spend = float(sum(costs[k, j] for k, j in shadowed))
    cost = float(costs[index, picked].sum()) + shadow_spend
    singles = [
        (float(costs[:, j].sum()), float(np.nanmean(scores[scored, j]))) for j in range(len(models))
    ]
    believed = np.mean([beliefs[int(i)] for i in rows], axis=0)
    return Block(
        first=int(rows[0]),
        queries=len(rows),
        accuracy=float(np.nanmean(scores[index, picked])),
        cost_usd=cost,
        exploration_spend_usd=float(costs[index, picked][explored].sum()),
        shadow_spend_usd=shadow_spend,
        shadow_queries=len(shadowed),
        scored_so_far=scored_so_far,
        warm_accuracy=float(np.nanmean(scores[index, warm])),
        warm_cost_usd=float(costs[index, warm].sum()),
        best_single_accuracy=evaluate.hull_accuracy(evaluate.upper_hull(singles), cost),
        share_per_model={
            m: float(np.mean(picked == j)) for j, m in enumerate(models) if (picked == j).any()
        },
        predicted_cost_usd=sum(a.predicted_cost_usd for a in assignments),
        believed=dict(zip(models, believed.tolist(), strict=True)),
        actual=dict(zip(models, np.nanmean(scores, axis=0).tolist(), strict=True)),
    )


def plot(figures: ColdStartFigures, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ends = [b.first + b.queries for b in figures.blocks]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(ends, [b.accuracy for b in figures.blocks], "o-", label="cold start (router)")
    top.plot(ends, [b.warm_accuracy for b in figures.blocks], "s--", label="warm-started router")
    best_single = [b.best_single_accuracy for b in figures.blocks]
    top.plot(ends, best_single, ":", label="best single model, same cost")
    top.set_ylabel("routed accuracy (recorded scores)")
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot(ends, [b.cost_usd for b in figures.blocks], "o-", label="spend")
    bottom.plot(ends, figures.budget_per_block, "k--", label="budget")
    exploration = [b.exploration_spend_usd for b in figures.blocks]
    bottom.plot(ends, exploration, "^-", label="exploration spend")
    shadow = [b.shadow_spend_usd for b in figures.blocks]
    bottom.plot(ends, shadow, "v-", label="shadow answers' spend")
    bottom.set_ylabel("USD per block")
    bottom.set_xlabel("queries routed")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.suptitle("Learning from an empty store (judge-scored sample)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
