"""`omnirouter bench signal`: what a better quality predictor would buy.

Routes a RouterBench-format file by cross-validation exactly as `omnirouter
evaluate` does, but with synthetic quality estimates of a chosen within-task
AUC in place of the predictor's. Each estimate starts from the query's task
accuracy on the training folds and is moved by a noisy reading of the real
outcome, combined by Bayes' rule so that it stays calibrated: a Gaussian
reading z ~ N(+d/2, 1) for a right answer and N(-d/2, 1) for a wrong one has
AUC Phi(d / sqrt 2) and log-likelihood ratio d * z. Noise is independent per
model and query. Costs are each task's training mean.

The table it prints says how strong a predictor must be for a routing target;
`omnirouter evaluate` prints the AUC the real predictor has.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from statistics import NormalDist
from typing import cast

import numpy as np
from numpy.typing import NDArray

from workers.routing import evaluate as evaluation
from workers.routing.dataset import OutcomeTable
from workers.routing.predictor import Estimates


@dataclass(frozen=True)
class SignalFigures:
    auc_requested: float
    auc_measured: float
    aiq: float
    best_model: str
    cheapest_model: str
    accuracy_at_35pct_of_best_model_cost: float | None
    cost_share_to_reach_best_model_accuracy: float | None
    margin_at_each_model_cost: dict[str, float | None]


def signal_strength(auc: float) -> float:
    """d such that a reading N(+d/2, 1) vs N(-d/2, 1) separates classes with this AUC."""
    if not 0.5 <= auc < 1.0:
        raise ValueError(f"AUC must be in [0.5, 1), got {auc}")
    return float(np.sqrt(2.0) * NormalDist().inv_cdf(auc))


def synthetic_quality(
    prior: NDArray[np.float64],
    outcomes: NDArray[np.float64],
    auc: float,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """Calibrated P(good answer) from the prior and a noisy reading of the outcome.
    An unknown outcome (NaN) gives no reading: the prior stays."""
    d = signal_strength(auc)
    clipped = np.clip(prior, 1e-4, 1 - 1e-4)
    prior_logit = np.log(clipped / (1 - clipped))
    known = ~np.isnan(outcomes)
    reading = d * (np.where(known, outcomes, 0.5) - 0.5) + rng.standard_normal(outcomes.shape)
    posterior_logit = prior_logit + np.where(known, d * reading, 0.0)
    return 1.0 / (1.0 + np.exp(-posterior_logit))


def run(
    table: OutcomeTable,
    aucs: list[float],
    window_size: int = 200,
    folds: int = 5,
    seed: int = 0,
) -> list[SignalFigures]:
    scores = table.scores[~np.isnan(table.scores)]
    if ((scores != 0.0) & (scores != 1.0)).any():
        # A fractional score is no right or wrong answer for the reading to tell
        # apart: the estimates would be neither of the AUC asked for nor calibrated.
        raise ValueError(
            "bench signal reads right or wrong answers (scores 0 or 1); this file holds "
            "fractional scores"
        )
    settings = evaluation.EvaluationSettings(
        window_size=window_size, modes=("budget",), solver="fast", seed=seed
    )
    budgets = evaluation.per_query_budgets(table.costs, settings.budget_levels)
    fold_of = evaluation.group_folds(table.sample_ids, folds, seed)

    def predictions(auc: float) -> Iterator[tuple[OutcomeTable, Estimates]]:
        rng = np.random.default_rng(seed)
        for fold in range(folds):
            fit_part = table.take(np.flatnonzero(fold_of != fold))
            test_part = table.take(np.flatnonzero(fold_of == fold))
            fit_tasks, test_tasks = fit_part.eval_names, test_part.eval_names
            prior = evaluation.task_means(fit_part.scores, fit_tasks, test_tasks)
            quality = synthetic_quality(prior, test_part.scores, auc, rng)
            cost = evaluation.task_means(fit_part.costs, fit_tasks, test_tasks)
            vectors = np.zeros((len(test_part), 0), np.float32)
            yield test_part, Estimates(quality, cost, vectors, np.zeros_like(quality))

    figures = []
    for auc in aucs:
        points, measured = evaluation.score_splits(predictions(auc), budgets, settings)
        report = evaluation.build_report(
            points, table.models, settings, [], cross_validated=True, predictor_auc=measured
        )
        targets = report.targets
        figures.append(
            SignalFigures(
                auc_requested=auc,
                auc_measured=measured.get("all", float("nan")),
                aiq=report.aiq[evaluation.OMNIROUTER_BUDGET],
                best_model=str(targets["best_model"]),
                cheapest_model=min(
                    report.single_models, key=lambda m: report.single_models[m]["cost_usd"]
                ),
                accuracy_at_35pct_of_best_model_cost=cast(
                    "float | None", targets["accuracy_at_35pct_of_best_model_cost"]
                ),
                cost_share_to_reach_best_model_accuracy=cast(
                    "float | None", targets["cost_share_to_reach_best_model_accuracy"]
                ),
                margin_at_each_model_cost=cast(
                    "dict[str, float | None]", targets["margin_over_each_model_at_its_cost"]
                ),
            )
        )
    return figures
