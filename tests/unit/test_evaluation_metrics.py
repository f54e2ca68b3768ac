"""Evaluation metrics on tiny hand-made data whose answers are known."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from workers.routing.answer_scorer import ProbeAnswers
from workers.routing.evaluate import (
    AGREEMENT_RULE,
    Point,
    accuracy_at_cost,
    aiq,
    cost_to_reach,
    greedy_threshold_plan,
    group_folds,
    oracle_plan,
    record_agreement_rule,
    task_means,
    upper_hull,
    within_task_auc,
)


def test_hull_drops_dominated_points_and_points_under_a_chord() -> None:
    points = [(1.0, 0.5), (2.0, 0.55), (3.0, 0.9), (4.0, 0.8), (5.0, 0.9)]
    # (2, 0.55) lies under the chord (1, 0.5)-(3, 0.9); (4, 0.8) and (5, 0.9) buy nothing.
    assert upper_hull(points) == [(1.0, 0.5), (3.0, 0.9)]


def test_hull_keeps_one_point_per_cost_also_at_its_start() -> None:
    """Two points of the cheapest cost: only the better one is on the hull (it used to
    keep both, a vertical first segment that no later point could remove)."""
    points = [(1.0, 0.5), (1.0, 0.6), (2.0, 0.8), (3.0, 0.85)]
    assert upper_hull(points) == [(1.0, 0.6), (2.0, 0.8), (3.0, 0.85)]


def test_aiq_of_a_flat_router_is_its_accuracy() -> None:
    assert aiq([(1.0, 0.7)], 0.0, 10.0) == pytest.approx(0.7)


def test_aiq_is_the_mean_accuracy_over_the_cost_range() -> None:
    # Rises linearly from 0.5 at cost 0 to 0.9 at cost 2, then flat to 4:
    # area = 2 * 0.7 + 2 * 0.9 = 3.2 over a range of 4.
    assert aiq([(0.0, 0.5), (2.0, 0.9)], 0.0, 4.0) == pytest.approx(0.8, abs=1e-6)


def test_accuracy_at_a_cost_interpolates_and_is_none_below_the_cheapest_point() -> None:
    points = [(1.0, 0.5), (3.0, 0.9)]
    assert accuracy_at_cost(points, 2.0) == pytest.approx(0.7)
    assert accuracy_at_cost(points, 10.0) == pytest.approx(0.9)
    assert accuracy_at_cost(points, 0.5) is None


def test_cost_to_reach_an_accuracy() -> None:
    points = [(1.0, 0.5), (3.0, 0.9)]
    assert cost_to_reach(points, 0.7) == pytest.approx(2.0)
    assert cost_to_reach(points, 0.4) == pytest.approx(1.0)
    assert cost_to_reach(points, 0.95) is None


def test_oracle_takes_the_cheapest_correct_model_else_the_cheapest() -> None:
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    costs = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 1.0, 3.0]])
    assert oracle_plan(scores, costs).tolist() == [1, 2, 1]


def test_oracle_on_fractional_scores_takes_the_cheapest_best_scored_model() -> None:
    """Scores in (0, 1) (a rubric's, a BLEU): no model scores 1.0, and the oracle took
    the cheapest model on every row, below the best single model."""
    scores = np.array([[0.2, 0.9, 0.9], [0.7, 0.4, 0.1], [0.5, 0.5, 0.5]])
    costs = np.array([[1.0, 3.0, 2.0], [3.0, 2.0, 1.0], [2.0, 1.0, 3.0]])
    assert oracle_plan(scores, costs).tolist() == [2, 0, 1]


def test_oracle_reads_a_missing_score_as_no_answer() -> None:
    """A row with a model's score missing still goes to the cheapest model that scored
    best among the others (the row's maximum is NaN); a row of none, to the cheapest."""
    nan = np.nan
    scores = np.array([[nan, 1.0, 1.0], [nan, nan, nan], [nan, 0.0, 0.0]])
    costs = np.array([[1.0, 3.0, 2.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    assert oracle_plan(scores, costs).tolist() == [2, 2, 2]


def test_the_agreement_rule_escalates_to_the_model_predicted_best_not_the_dearest() -> None:
    """A file whose dearest model is not its best (RouterBench's is): the rule sent
    every disagreement to the dearest model, a worse answer at the highest price."""
    answers = ProbeAnswers.of([["yes", "no"], ["yes", "yes"]])
    truth = np.array([[0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    spent = np.array([[0.1, 0.1, 0.5, 2.0], [0.1, 0.1, 0.5, 2.0]])
    quality = np.array([[0.3, 0.3, 0.9, 0.4], [0.3, 0.3, 0.9, 0.4]])
    points: dict[str, dict[float, Point]] = {}
    record_agreement_rule(answers, [0, 1], truth, spent, quality=quality, points=points)
    (rule,) = points[AGREEMENT_RULE].values()
    assert rule.accuracy == 1.0
    assert rule.escalation_usd == pytest.approx(0.5)


def test_the_agreement_rule_never_escalates_to_a_panel_model() -> None:
    """A panel model predicted best (model 1) would be asked again and paid twice:
    the rule escalates to the best model outside the panel."""
    answers = ProbeAnswers.of([["yes", "no"], ["no", "yes"]])
    truth = np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    spent = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    quality = np.array([[0.3, 0.9, 0.8], [0.3, 0.9, 0.8]])
    points: dict[str, dict[float, Point]] = {}
    record_agreement_rule(answers, [0, 1], truth, spent, quality=quality, points=points)
    (rule,) = points[AGREEMENT_RULE].values()
    assert rule.escalation_usd == pytest.approx(6.0)  # model 2, twice


def test_a_panel_of_one_probe_has_no_agreement_rule() -> None:
    """A two-model file's panel is one probe, which agreed with itself on every
    query: the cheapest model was reported as the agreement rule."""
    answers = ProbeAnswers.of([["yes"], ["no"]])
    truth = np.array([[0.0, 1.0], [0.0, 1.0]])
    spent = np.array([[0.1, 1.0], [0.1, 1.0]])
    points: dict[str, dict[float, Point]] = {}
    record_agreement_rule(answers, [0], truth, spent, quality=truth, points=points)
    assert AGREEMENT_RULE not in points


def test_greedy_takes_the_cheapest_model_clearing_the_threshold() -> None:
    quality = np.array([[0.9, 0.6, 0.3], [0.2, 0.3, 0.4]])
    cost = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    # Row 0: models 0 and 1 clear 0.5, model 1 is cheaper. Row 1: none clears, best is 2.
    assert greedy_threshold_plan(quality, cost, 0.5).tolist() == [1, 2]
    assert greedy_threshold_plan(quality, cost, 0.0).tolist() == [2, 2]


def test_repeated_sample_ids_share_a_fold() -> None:
    ids = ["a", "b", "a", "c", "d", "b", "e"]
    folds = group_folds(ids, folds=3, seed=0)
    assert folds[0] == folds[2] and folds[1] == folds[5]
    assert set(folds.tolist()) == {0, 1, 2}


def test_within_task_auc_ranks_within_each_task_only() -> None:
    tasks = ["math"] * 4 + ["trivia"] * 4
    truth = np.array(
        # model 0: right on the first half of each task; model 1: always right on math
        [[1, 1], [1, 1], [0, 1], [0, 1], [1, 0], [1, 1], [0, 0], [0, np.nan]],
        dtype=float,
    )
    # Model 0 is ranked perfectly within each task; model 1 only tells the tasks
    # apart (higher on math), which is no ranking at all within trivia.
    quality = np.array(
        [
            [0.9, 0.8],
            [0.8, 0.8],
            [0.2, 0.8],
            [0.1, 0.8],
            [0.6, 0.3],
            [0.5, 0.3],
            [0.4, 0.3],
            [0.3, 0.3],
        ]
    )
    auc = within_task_auc(quality, truth, tasks)
    # math: model 1 has only right answers there, so only model 0 counts.
    assert auc["math"] == pytest.approx(1.0)
    # trivia: model 0 perfect (1.0), model 1 all tied over its known rows (0.5).
    assert auc["trivia"] == pytest.approx(0.75)
    assert auc["all"] == pytest.approx((1.0 + 1.0 + 0.5) / 3)


def test_within_task_auc_by_split_does_not_count_differences_between_folds() -> None:
    # A per-task table learned on the other folds: constant within each fold, and
    # lower for the fold that did better (it learned from the worse ones).
    truth = np.array([[1], [1], [1], [0], [1], [0], [0], [0]], dtype=float)
    splits = [0, 0, 0, 0, 1, 1, 1, 1]
    quality = np.array([[0.25]] * 4 + [[0.75]] * 4)
    tasks = ["t"] * 8
    assert within_task_auc(quality, truth, tasks)["t"] < 0.5
    assert within_task_auc(quality, truth, tasks, splits)["t"] == pytest.approx(0.5)


def test_task_means_ignore_unknowns_and_fall_back_to_the_overall_mean() -> None:
    values = np.array([[1.0, np.nan], [0.0, 4.0], [1.0, 2.0]])
    means = task_means(values, ["a", "a", "b"], ["b", "a", "new"])
    assert means[0].tolist() == [1.0, 2.0]
    assert means[1].tolist() == [0.5, 4.0]
    assert means[2] == pytest.approx([2 / 3, 3.0])


def two_model_table(tasks: list[str], scores: list[list[float]], costs: list[list[float]]):
    """A test file of two models ("cheap", "dear") and the estimates of a predictor
    that knows every outcome and cost: what routing can do is then the solver's and
    the evaluation's doing alone."""
    from workers.routing.dataset import OutcomeTable
    from workers.routing.predictor import Estimates

    n = len(tasks)
    table = OutcomeTable(
        sample_ids=[f"q{i}" for i in range(n)],
        eval_names=tasks,
        prompts=[f"prompt {i}" for i in range(n)],
        models=["cheap", "dear"],
        scores=np.array(scores, dtype=float),
        costs=np.array(costs, dtype=float),
        responses=[{} for _ in range(n)],
    )
    estimates = Estimates(
        table.scores.copy(), table.costs.copy(), np.zeros((n, 2), np.float32), np.ones((n, 2))
    )
    return table, estimates


def test_a_file_sorted_by_task_is_routed_in_windows_of_mixed_tasks() -> None:
    """Task a needs the dear model (cost 2), task b does not (the cheap one, 0.1, is
    right there). At 1.5 a query, windows of one task each leave a's windows 50
    queries short of the dear model while b's spend 0.1 a query; real traffic
    interleaves them, and then every query can have its right model."""
    from workers.routing.evaluate import OMNIROUTER_BUDGET, EvaluationSettings, route_split

    n = 200
    tasks = ["a"] * n + ["b"] * n
    scores = [[0.0, 1.0]] * n + [[1.0, 1.0]] * n
    costs = [[0.1, 2.0]] * n + [[0.1, 1.0]] * n
    table, estimates = two_model_table(tasks, scores, costs)
    points: dict = {}
    settings = EvaluationSettings(window_size=n, modes=("budget",), solver="fast")
    route_split(table, estimates, np.array([1.5]), settings, points)
    assert points[OMNIROUTER_BUDGET][1.5].accuracy == 1.0


def test_the_router_is_measured_at_the_dearest_model_s_cost_from_above() -> None:
    """The dear model is always right and costs 1 or 2 a query (1.5 on average); a
    window that drew more of its dearer queries cannot have it throughout at 1.5 a
    query. A higher budget lets every window have it: spending no more than the
    dear model, the router must not read below it at its cost."""
    from workers.routing.evaluate import (
        EvaluationSettings,
        build_report,
        per_query_budgets,
        score_splits,
    )

    n = 400
    costs = [[0.1, 1.0 + i % 2] for i in range(n)]
    table, estimates = two_model_table(["a"] * n, [[0.0, 1.0]] * n, costs)
    settings = EvaluationSettings(window_size=10, modes=("budget",), solver="fast")
    budgets = per_query_budgets(table.costs, settings.budget_levels)
    points, auc = score_splits([(table, estimates)], budgets, settings)
    report = build_report(points, table.models, settings, [], False, auc)
    margins = report.targets["margin_over_each_model_at_its_cost"]
    assert isinstance(margins, dict) and margins["dear"] == pytest.approx(0.0, abs=1e-9)


class HashEmbedder:
    """A unit vector per text, from its hash: no model to load."""

    name = "hash"
    dimension = 8

    def embed(self, texts: list[str]) -> np.ndarray:
        seeds = [int(hashlib.sha1(t.encode()).hexdigest()[:8], 16) for t in texts]
        vectors = np.array([np.random.default_rng(s).normal(size=self.dimension) for s in seeds])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_quality_targets_span_the_models_of_a_hard_file() -> None:
    """Models right on 15% and 40% of the prompts: the fixed targets (0.55 to 0.95,
    RouterBench's models span 0.54 to 0.88) were all out of reach, and every point of
    the quality router was the same best-quality plan, its AIQ that plan's accuracy."""
    from workers.routing.dataset import OutcomeTable
    from workers.routing.evaluate import OMNIROUTER_QUALITY, EvaluationSettings, evaluate

    n = 100
    rng = np.random.default_rng(0)
    table = OutcomeTable(
        sample_ids=[f"q{i}" for i in range(n)],
        eval_names=["hard"] * n,
        prompts=[f"prompt {i}" for i in range(n)],
        models=["cheap", "dear"],
        scores=(rng.random((n, 2)) < [0.15, 0.4]).astype(float),
        costs=np.tile([0.001, 0.01], (n, 1)),
        responses=[{} for _ in range(n)],
    )
    settings = EvaluationSettings(window_size=20, modes=("quality",), solver="fast", cascade=False)
    report = evaluate(table, None, HashEmbedder(), settings)
    points = report.routers[OMNIROUTER_QUALITY]
    dear_cost = report.single_models["dear"]["cost_usd"]
    assert min(p["cost_usd"] for p in points) < 0.5 * dear_cost
    assert len({round(p["cost_usd"], 9) for p in points}) >= 4
