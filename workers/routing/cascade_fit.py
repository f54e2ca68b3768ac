"""A cascade pool's policy fitted from stored outcomes (pure: the router reads the
rows from PostgreSQL, workers/db/repository.scored_answers, and calls this).

The scorer learns from stored queries with the panel's answers and scores: the
panel's own (configured), or, for a panel chosen from history, queries with at
least two models' answers. Beside the answers it reads the one-shot predictor's
quality for each query from a predictor that did not see it (out of fold, as
`omnirouter evaluate` fits it). Fewer such queries than the pool's minimum: no
policy, and the pool routes one-shot (never a cascade fitted on a handful).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from workers.routing.cascade import fit_cascade, out_of_fold_quality
from workers.routing.cascade_window import FittedCascade
from workers.routing.embedder import Embedder
from workers.routing.predictor import KnnSettings

# Folds of the out-of-fold predictions the scorer learns beside the answers.
PREDICTION_FOLDS = 3
# A chosen panel needs queries where this many models have answered.
MIN_ANSWERS_PER_QUERY = 2
# The newest stored queries' outcomes a fit reads at most (of every pool model):
# it bounds the time of a fit, which chooses the panel and fits every model's head
# (60 s for 2,217 RouterBench queries, panel chosen, on a loaded 2-core machine;
# the offline evaluation's folds train on about 1,800).
MAX_FIT_QUERIES = 2000


@dataclass(frozen=True)
class AnsweredOutcome:
    """One scored outcome with the model's answer excerpt and its query's vector."""

    query_id: str
    model: str
    quality_score: float
    cost_usd: float | None
    response: str | None
    embedding: NDArray[np.float32] | None
    embedder: str | None
    text: str | None


@dataclass(frozen=True)
class CascadeData:
    """Stored queries as matrices over the pool's models (NaN / None: unknown)."""

    query_ids: list[str]
    vectors: NDArray[np.float32]
    truth: NDArray[np.float64]
    costs: NDArray[np.float64]
    responses: list[list[str | None]]
    prompt_chars: list[int]


def gather(
    rows: Sequence[AnsweredOutcome],
    models: Sequence[str],
    embedder: str,
    panel: Sequence[str] | None,
) -> CascadeData:
    """The queries to learn from: with a vector of `embedder`, and the configured
    panel's answers (all of them), else answers of at least two models."""
    column = {m: j for j, m in enumerate(models)}
    by_query: dict[str, list[AnsweredOutcome]] = {}
    for row in rows:
        if row.model in column:
            by_query.setdefault(row.query_id, []).append(row)
    kept: list[tuple[str, NDArray[np.float32], list[AnsweredOutcome]]] = []
    for query_id, outcomes in by_query.items():
        vector = next(
            (o.embedding for o in outcomes if o.embedding is not None and o.embedder == embedder),
            None,
        )
        answered = {o.model for o in outcomes if o.response}
        enough = (
            set(panel) <= answered if panel is not None else len(answered) >= MIN_ANSWERS_PER_QUERY
        )
        if vector is not None and enough:
            kept.append((query_id, vector, outcomes))
    n, m = len(kept), len(models)
    truth, costs = np.full((n, m), np.nan), np.full((n, m), np.nan)
    responses: list[list[str | None]] = [[None] * m for _ in range(n)]
    chars = []
    for i, (_, _, outcomes) in enumerate(kept):
        for o in outcomes:
            j = column[o.model]
            truth[i, j] = o.quality_score
            costs[i, j] = np.nan if o.cost_usd is None else o.cost_usd
            responses[i][j] = o.response
        chars.append(max((len(o.text) for o in outcomes if o.text), default=0))
    dimension = kept[0][1].shape[0] if kept else 0
    vectors = (
        np.vstack([v for _, v, _ in kept]).astype(np.float32)
        if kept
        else np.zeros((0, dimension), dtype=np.float32)
    )
    return CascadeData([q for q, _, _ in kept], vectors, truth, costs, responses, chars)


def fit_pool_cascade(
    rows: Sequence[AnsweredOutcome],
    models: Sequence[str],
    panel: Sequence[str] | None,
    embedder: Embedder,
    knn: KnnSettings,
    min_queries: int,
    seed: int = 0,
    capped: Sequence[str] = (),
) -> tuple[FittedCascade | None, int]:
    """The pool's fitted cascade (None below `min_queries` usable stored queries),
    and how many queries it had to learn from. A chosen panel leaves out the
    `capped` models (ROUTER_MODEL_CAPACITIES)."""
    data = gather(rows, models, embedder.name, panel)
    if len(data.query_ids) < min_queries:
        return None, len(data.query_ids)
    predicted = out_of_fold_quality(
        models, data.query_ids, data.vectors, data.truth, data.costs,
        data.prompt_chars, embedder, knn, PREDICTION_FOLDS, seed,
    )  # fmt: skip
    panel_columns = None if panel is None else [list(models).index(m) for m in panel]
    probe_models = [j for j, m in enumerate(models) if m not in capped]
    policy = fit_cascade(
        data.query_ids, data.vectors, data.responses, predicted, data.truth,
        data.costs, panel=panel_columns, probe_models=probe_models,
    )  # fmt: skip
    return FittedCascade(policy, list(models)), len(data.query_ids)
