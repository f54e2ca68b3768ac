"""A cascade pool's policy from stored outcomes (workers/routing/cascade_fit.py): only
queries with the panel's answers and a vector of the router's embedder count, and
below the minimum there is no policy (the pool routes one-shot)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from tests.unit.test_cascade import recorded, unit_vectors
from workers.routing.cascade_fit import AnsweredOutcome, fit_pool_cascade, gather
from workers.routing.predictor import KnnSettings

MODELS = ["cheap-a", "cheap-b", "dear"]


class Embedder:
    name = "test-embedder"
    dimension = 8

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return unit_vectors(len(texts), 0)


def stored(
    n: int, embedder: str = Embedder.name, answered: Sequence[str] = MODELS
) -> list[AnsweredOutcome]:
    responses, truth, costs = recorded(n, seed=2)
    vectors = unit_vectors(n, 2)
    return [
        AnsweredOutcome(
            query_id=f"s{i}",
            model=m,
            quality_score=float(truth[i, j]),
            cost_usd=float(costs[i, j]),
            response=responses[i][j] if m in answered else None,
            embedding=vectors[i],
            embedder=embedder,
            text="question",
        )
        for i in range(n)
        for j, m in enumerate(MODELS)
    ]


def test_only_queries_with_the_panel_s_answers_and_our_vectors_are_learned_from() -> None:
    renamed = [
        replace(r, query_id=f"other-{r.query_id}") for r in stored(5, embedder="another-embedder")
    ]
    half = [replace(r, query_id=f"half-{r.query_id}") for r in stored(7, answered=["cheap-a"])]
    data = gather([*stored(10), *renamed, *half], MODELS, Embedder.name, ["cheap-a", "cheap-b"])
    assert len(data.query_ids) == 10
    assert data.truth.shape == (10, 3) and data.vectors.shape == (10, 8)
    chosen = gather([*stored(10), *half], MODELS, Embedder.name, None)
    assert len(chosen.query_ids) == 10  # a chosen panel needs two models' answers


def test_too_few_stored_answers_give_no_policy() -> None:
    fitted, usable = fit_pool_cascade(
        stored(40), MODELS, ["cheap-a", "cheap-b"], Embedder(), KnnSettings(), min_queries=100
    )
    assert fitted is None and usable == 40


def test_enough_stored_answers_give_a_policy_with_the_configured_panel() -> None:
    fitted, usable = fit_pool_cascade(
        stored(150), MODELS, ["cheap-a", "cheap-b"], Embedder(), KnnSettings(), min_queries=100
    )
    assert fitted is not None and usable == 150
    assert fitted.panel == ["cheap-a", "cheap-b"] and fitted.models == MODELS
