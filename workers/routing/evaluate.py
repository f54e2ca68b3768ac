"""Offline evaluation: how well routing does on real outcomes, next to baselines.

Every router sees only predictions made from the training part; its choices
are then scored with the test part's real outcomes (accuracy and dollars).
Test prompts whose outcome is unknown for some model are left out of scoring,
since a null score is unknown, not wrong.

Metrics:
- a router's points (cost, accuracy), one per budget, target or threshold;
- AIQ (RouterBench, Hu et al. 2024): the area under the router's
  non-decreasing convex hull of points over the cost range spanned by the
  single models (cheapest to dearest), divided by that range; the hull is
  extended flat beyond the router's first and last points;
- accuracy at the cost of model X: the hull's accuracy at X's cost;
- the predictor's within-task AUC: how well its quality estimates tell a
  model's right answers from its wrong ones among prompts of one task. Telling
  tasks apart is easy; routing beyond what a per-task table gives needs this
  to be well above 0.5.

The answer-aware cascade (workers/routing/cascade.py) is routed from the recorded
responses, in each mode the one-shot router is (budget: cascade_budget; quality,
at the same targets: cascade_quality): a probed query's panel answers are the
file's, its cost includes every probe and escalation. Beside it, the plain
agreement rule: probe with the same two cheap models, accept when their final
answers agree, else the model predicted best (one point). The answer scorer's
within-task AUC (its P(good) of the probe models' answers) is reported next to
the predictor's on the same answers.

Two bounds bracket OmniRouter, on the same windows and budgets:
- task_oracle_budget: the ILP fed each task's true per-model accuracy and cost,
  what a predictor that only knows the task can reach;
- oracle_budget: the ILP fed the true outcomes and costs, what any predictor
  can reach (the headroom).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score

from workers.routing.answer_scorer import ProbeAnswers
from workers.routing.cascade import (
    CascadePolicy,
    OptionMatrices,
    fit_cascade,
    group_folds,
    out_of_fold_quality,
    price_options,
    run_window,
)
from workers.routing.dataset import OutcomeTable
from workers.routing.embedder import Embedder
from workers.routing.optimizer import Method, Mode, Uncertainty, WindowProblem, solve
from workers.routing.predictor import Estimates, HybridPredictor, KnnSettings
from workers.routing.store import RetrievalStore

OMNIROUTER_BUDGET = "omnirouter_budget"
OMNIROUTER_QUALITY = "omnirouter_quality"
GREEDY = "greedy_threshold"
TASK_ORACLE = "task_oracle_budget"
ORACLE_BUDGET = "oracle_budget"
CASCADE = "cascade_budget"
CASCADE_QUALITY = "cascade_quality"
AGREEMENT_RULE = "agreement_rule"
CURVE_ROUTERS = (
    OMNIROUTER_BUDGET,
    OMNIROUTER_QUALITY,
    GREEDY,
    TASK_ORACLE,
    ORACLE_BUDGET,
    CASCADE,
    CASCADE_QUALITY,
)


@dataclass
class Point:
    """One operating point; the setting is a budget (USD), a target, or a threshold."""

    setting: float
    correct: float = 0.0
    cost_usd: float = 0.0
    queries: int = 0
    # Of cost_usd, what probes and escalations cost (cascades only).
    probe_usd: float = 0.0
    escalation_usd: float = 0.0

    def add(self, correct: float, cost_usd: float, queries: int) -> None:
        self.correct += correct
        self.cost_usd += cost_usd
        self.queries += queries

    @property
    def accuracy(self) -> float:
        return self.correct / self.queries if self.queries else float("nan")


@dataclass
class EvaluationSettings:
    window_size: int = 200
    modes: tuple[Mode, ...] = ("budget", "quality")
    solver: Method = "exact"
    budget_levels: int = 24
    # Empty: spread over the training part's models (`quality_targets_for`).
    quality_targets: tuple[float, ...] = ()
    thresholds: tuple[float, ...] = tuple(np.round(np.linspace(0.0, 1.0, 21), 2))
    knn: KnnSettings = field(default_factory=KnnSettings)
    # As the router's ROUTER_TIE_TOLERANCE: ties and near-ties to the cheaper model.
    tie_tolerance: float = 0.005
    seed: int = 0
    # Fit and route the answer-aware cascade (in each of `modes`) and the agreement rule.
    cascade: bool = True
    # Folds of the training part that give its queries out-of-fold predictions,
    # which the cascade's scorer learns from (as a router's stored predictions).
    cascade_inner_folds: int = 3


# ------------------------------------------------------------------------ metrics


def upper_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-decreasing upper convex hull of (cost, accuracy) points, by cost.

    Mixing two operating points at random reaches any point between them, so
    the hull is what a router can offer at each cost.
    """
    hull: list[tuple[float, float]] = []
    for cost, accuracy in sorted(set(points)):
        if hull and accuracy <= hull[-1][1]:
            continue  # dearer and no better
        if hull and cost == hull[-1][0]:
            hull.pop()  # as dear and better (points of one cost come by accuracy)
        while len(hull) >= 2:
            (c1, a1), (c2, a2) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or below the chord.
            if (a2 - a1) * (cost - c1) <= (accuracy - a1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append((cost, accuracy))
    return hull


def hull_accuracy(hull: Sequence[tuple[float, float]], cost: float) -> float:
    costs = [c for c, _ in hull]
    accuracies = [a for _, a in hull]
    return float(np.interp(cost, costs, accuracies))


def aiq(points: Sequence[tuple[float, float]], cost_low: float, cost_high: float) -> float:
    """Average accuracy over [cost_low, cost_high] on the router's hull."""
    hull = upper_hull(points)
    if not hull or cost_high <= cost_low:
        return float("nan")
    grid = np.linspace(cost_low, cost_high, 2001)
    values = np.interp(grid, [c for c, _ in hull], [a for _, a in hull])
    return float(np.trapezoid(values, grid) / (cost_high - cost_low))


def accuracy_at_cost(points: Sequence[tuple[float, float]], cost: float) -> float | None:
    """The hull's accuracy at `cost`; None when the router has no point that cheap."""
    hull = upper_hull(points)
    if not hull or cost < hull[0][0]:
        return None
    return hull_accuracy(hull, cost)


def cost_to_reach(points: Sequence[tuple[float, float]], accuracy: float) -> float | None:
    """Least cost at which the hull reaches `accuracy`; None if it never does."""
    hull = upper_hull(points)
    for (c1, a1), (c2, a2) in itertools.pairwise(hull):
        if a1 >= accuracy:
            return c1
        if a2 >= accuracy:
            return c1 + (accuracy - a1) * (c2 - c1) / (a2 - a1)
    if hull and hull[-1][1] >= accuracy:
        return hull[-1][0]
    return None


def within_task_auc(
    quality: NDArray[np.float64],
    truth: NDArray[np.float64],
    tasks: Sequence[str],
    splits: Sequence[int] | None = None,
) -> dict[str, float]:
    """Mean AUC of predicted quality against real outcomes, over models, within each
    task ("all": over every task and model). With `splits`, AUCs are taken within
    each split and averaged: pooled across cross-validation folds they would read
    below 0.5 even for a per-task table, since a fold that did better than the rest
    had a lower mean to learn from. A model whose outcomes in a cell are all alike,
    or unknown, is left out there: it has nothing to rank."""
    task_of = np.asarray(tasks)
    split_of = np.zeros(len(task_of), dtype=int) if splits is None else np.asarray(splits)
    by_task: dict[str, list[float]] = {}
    for task, split in sorted(set(zip(task_of.tolist(), split_of.tolist(), strict=True))):
        for j in range(truth.shape[1]):
            rows = (task_of == task) & (split_of == split) & ~np.isnan(truth[:, j])
            outcomes = truth[rows, j] >= 0.5
            if outcomes.all() or not outcomes.any():
                continue
            auc = float(roc_auc_score(outcomes, quality[rows, j]))
            by_task.setdefault(task or "unlabelled", []).append(auc)
    means = {task: float(np.mean(aucs)) for task, aucs in by_task.items()}
    if by_task:
        means["all"] = float(np.mean([a for aucs in by_task.values() for a in aucs]))
    return means


def task_means(
    values: NDArray[np.float64], tasks_of_values: Sequence[str], tasks: Sequence[str]
) -> NDArray[np.float64]:
    """For each of `tasks`, the mean of each column of `values` over the rows of that
    task (NaN ignored); the mean over all rows for a task `values` has no row of."""
    task_of = np.asarray(tasks_of_values)
    overall = np.nanmean(values, axis=0)
    means = {
        task: np.nanmean(values[task_of == task], axis=0) if (task_of == task).any() else overall
        for task in set(tasks)
    }
    return np.array([means[task] for task in tasks]).reshape(len(tasks), values.shape[1])


# ------------------------------------------------------------------------ routers


def greedy_threshold_plan(
    quality: NDArray[np.float64], cost: NDArray[np.float64], threshold: float
) -> NDArray[np.int64]:
    """RouteLLM-style per-query routing: the cheapest model whose predicted quality
    clears the threshold, else the model predicted best."""
    clears = quality >= threshold
    cheapest_clearing = np.where(clears, cost, np.inf).argmin(axis=1)
    return np.where(clears.any(axis=1), cheapest_clearing, quality.argmax(axis=1)).astype(np.int64)


def oracle_plan(scores: NDArray[np.float64], costs: NDArray[np.float64]) -> NDArray[np.int64]:
    """The cheapest of the models that scored best: with 0/1 scores the cheapest that
    answered well, else the cheapest. Best, not 1.0: fractional scores (a rubric's)
    may reach 1.0 nowhere, and the oracle was then the cheapest model throughout."""
    known = np.nan_to_num(scores, nan=-np.inf)  # a missing score is no answer
    good = np.isfinite(known) & (known >= known.max(axis=1, keepdims=True))
    cheapest_good = np.where(good, costs, np.inf).argmin(axis=1)
    return np.where(good.any(axis=1), cheapest_good, costs.argmin(axis=1)).astype(np.int64)


def windows_of(n: int, size: int) -> list[NDArray[np.int64]]:
    return [np.arange(start, min(start + size, n)) for start in range(0, n, size)]


def predict_split(
    train: OutcomeTable,
    train_vectors: NDArray[np.float32],
    test: OutcomeTable,
    test_vectors: NDArray[np.float32],
    embedder: Embedder,
    knn: KnnSettings,
) -> tuple[Estimates, float]:
    """Predictions for the test prompts from a predictor that knows only the training part."""
    store = RetrievalStore(train.models, train_vectors.shape[1])
    store.add_table(train.sample_ids, train_vectors, train.scores, train.costs)
    predictor = HybridPredictor(embedder, store, knn=knn)
    report = predictor.fit()
    estimates = predictor.predict_embedded(test_vectors, [len(p) for p in test.prompts])
    return estimates, report.blend_weight


def route_split(
    test: OutcomeTable,
    estimates: Estimates,
    budgets: NDArray[np.float64],
    settings: EvaluationSettings,
    points: dict[str, dict[float, Point]],
) -> None:
    """Route the scored test prompts with every router, in a seeded random order of
    arrival (`arrival_order`); add to `points`."""
    scored = np.flatnonzero(~np.isnan(test.scores).any(axis=1))
    scored = scored[arrival_order(len(scored), settings.seed)]
    truth: NDArray[np.float64] = test.scores[scored]
    spent: NDArray[np.float64] = test.costs[scored]
    quality: NDArray[np.float64] = estimates.quality[scored]
    cost: NDArray[np.float64] = estimates.cost[scored]
    uncertainty = None if estimates.uncertainty is None else estimates.uncertainty.take(scored)
    n, n_models = truth.shape
    rows = np.arange(n)

    def record(router: str, setting: float, plan: NDArray[np.int64]) -> None:
        point = points.setdefault(router, {}).setdefault(setting, Point(setting))
        point.add(float(truth[rows, plan].sum()), float(spent[rows, plan].sum()), n)

    for j, model in enumerate(test.models):
        record(f"model:{model}", 0.0, np.full(n, j))
    rng = np.random.default_rng(settings.seed)
    record("random", 0.0, rng.integers(0, n_models, size=(n,)))
    record("cheapest", 0.0, cost.argmin(axis=1))
    record("oracle", 0.0, oracle_plan(truth, spent))
    for threshold in settings.thresholds:
        record(GREEDY, threshold, greedy_threshold_plan(quality, cost, threshold))

    size = settings.window_size
    if "budget" in settings.modes:
        for per_query in budgets:
            plan = route_windows(
                quality,
                cost,
                size,
                "budget",
                per_query,
                settings.solver,
                settings.tie_tolerance,
                uncertainty,
            )
            record(OMNIROUTER_BUDGET, float(per_query), plan)
            # Same solver: the fast path leaves more on the table with 0/1 qualities.
            plan = route_windows(truth, spent, size, "budget", per_query, settings.solver)
            record(ORACLE_BUDGET, float(per_query), plan)
        tasks = [test.eval_names[i] for i in scored]
        if len(set(tasks)) > 1:
            # A bound for any predictor that only tells tasks apart: the same
            # windows solved with each task's true per-model accuracy and cost.
            task_quality = task_means(truth, tasks, tasks)
            task_cost = task_means(spent, tasks, tasks)
            for per_query in budgets:
                plan = route_windows(task_quality, task_cost, size, "budget", per_query, "fast")
                record(TASK_ORACLE, float(per_query), plan)
    if "quality" in settings.modes:
        for target in settings.quality_targets:
            plan = route_windows(
                quality, cost, size, "quality", target, settings.solver, settings.tie_tolerance
            )
            record(OMNIROUTER_QUALITY, target, plan)


@dataclass(frozen=True)
class CascadeSplit:
    """A split's fitted cascade and its test prompts' vectors."""

    policy: CascadePolicy
    vectors: NDArray[np.float32]


def fit_split_cascade(
    part: OutcomeTable,
    vectors: NDArray[np.float32],
    embedder: Embedder,
    settings: EvaluationSettings,
) -> CascadePolicy:
    # Folds by sample id, seeded apart from the outer split's.
    predicted = out_of_fold_quality(
        part.models, part.sample_ids, vectors, part.scores, part.costs,
        [len(p) for p in part.prompts], embedder, settings.knn,
        settings.cascade_inner_folds, settings.seed + 1,
    )  # fmt: skip
    responses = [[row[m] for m in part.models] for row in part.responses]
    return fit_cascade(part.sample_ids, vectors, responses, predicted, part.scores, part.costs)


def route_cascade_split(
    test: OutcomeTable,
    estimates: Estimates,
    cascade: CascadeSplit,
    budgets: NDArray[np.float64],
    settings: EvaluationSettings,
    points: dict[str, dict[float, Point]],
) -> NDArray[np.float64]:
    """Route the scored test prompts (in `route_split`'s order) with the cascade under
    every budget and with the agreement rule; add to `points`. Returns the scorer's
    posterior for the panel's answers of every scored prompt, to measure its AUC."""
    scored = np.flatnonzero(~np.isnan(test.scores).any(axis=1))
    scored = scored[arrival_order(len(scored), settings.seed)]
    truth, spent = test.scores[scored], test.costs[scored]
    quality, cost = estimates.quality[scored], estimates.cost[scored]
    vectors = cascade.vectors[scored]
    responses = [[test.responses[i][m] for m in test.models] for i in scored]
    policy, n = cascade.policy, len(scored)
    answers = ProbeAnswers.of([[r[j] for j in policy.panel] for r in responses])
    # Options and posteriors depend on the query alone: computed once for every window.
    clusters = policy.clusters(vectors)
    options = price_options(policy, clusters, quality, cost)
    posterior = policy.scorer.posterior(answers, quality, clusters)
    for name, mode, setting in cascade_settings(settings, budgets):
        point = points.setdefault(name, {}).setdefault(setting, Point(setting))
        for window in windows_of(n, settings.window_size):
            outcome = run_window(
                policy,
                quality[window],
                cost[window],
                vectors[window],
                [responses[i] for i in window],
                spent[window],
                mode,
                setting * len(window) if mode == "budget" else setting,
                settings.solver,
                settings.tie_tolerance,
                options=OptionMatrices(
                    options.quality[window], options.cost[window], options.probe_cost[window]
                ),
                posterior=posterior[window],
            )
            right = truth[window][np.arange(len(window)), outcome.final_model].sum()
            point.add(float(right), outcome.total_usd, len(window))
            point.probe_usd += outcome.probe_usd
            point.escalation_usd += outcome.escalation_usd
    record_agreement_rule(answers, policy.panel, truth, spent, quality, points)
    return posterior[:, policy.panel]


def cascade_settings(
    settings: EvaluationSettings, budgets: NDArray[np.float64]
) -> list[tuple[str, Mode, float]]:
    """The cascade's curves and their points: (router name, mode, budget per query or
    quality target), as the one-shot router's in each of `settings.modes`."""
    runs: list[tuple[str, Mode, float]] = []
    if "budget" in settings.modes:
        runs += [(CASCADE, "budget", float(b)) for b in budgets]
    if "quality" in settings.modes:
        runs += [(CASCADE_QUALITY, "quality", float(t)) for t in settings.quality_targets]
    return runs


def record_agreement_rule(
    answers: ProbeAnswers,
    panel: Sequence[int],
    truth: NDArray[np.float64],
    spent: NDArray[np.float64],
    quality: NDArray[np.float64],
    points: dict[str, dict[float, Point]],
) -> None:
    """Probe with the panel; accept the first probe's answer when every final answer
    is the same, else ask the model outside the panel predicted best (the dearest
    is not always the best; a panel model would be paid twice). A panel of one
    probe (a pool of two models) has nothing to agree with: no rule, not the probe
    alone under the rule's name."""
    outside = [j for j in range(quality.shape[1]) if j not in panel]
    if len(panel) < 2 or not outside:
        return
    best = outside[int(quality[:, outside].mean(axis=0).argmax())]
    agree = np.array([len(set(row)) == 1 and bool(row[0]) for row in answers.finals])
    final = np.where(agree, panel[0], best)
    rows = np.arange(len(truth))
    escalation = float(spent[rows[~agree], best].sum())
    probes = float(spent[:, list(panel)].sum())
    point = points.setdefault(AGREEMENT_RULE, {}).setdefault(0.0, Point(0.0))
    point.add(float(truth[rows, final].sum()), probes + escalation, len(truth))
    point.probe_usd += probes
    point.escalation_usd += escalation


def arrival_order(n: int, seed: int) -> NDArray[np.int64]:
    """The order the test prompts arrive in: seeded and random, as real traffic mixes
    kinds of query. Files are often sorted by task; windows of one task each would
    each get the same budget, so a dear task's windows could not have the dear
    model that a cheap task's windows leave unspent, a handicap of the file's order
    that no single model (which has no budget) bears."""
    return np.random.default_rng([seed, n]).permutation(n).astype(np.int64)


def route_windows(
    quality: NDArray[np.float64],
    cost: NDArray[np.float64],
    window_size: int,
    mode: Mode,
    limit: float,
    solver: Method,
    tie_tolerance: float = 0.0,
    uncertainty: Uncertainty | None = None,
) -> NDArray[np.int64]:
    """Route queries in consecutive windows of `window_size`; `limit` is the budget
    per query (budget mode: the window's budget is it times the window's queries)
    or the quality target (quality mode); `uncertainty`: the predictor's, for the
    single-model check of budget mode (`optimizer.keep_single_model`)."""
    plan = np.zeros(len(quality), dtype=np.int64)
    for window in windows_of(len(quality), window_size):
        problem = WindowProblem(
            quality[window],
            cost[window],
            mode,
            window_budget_usd=limit * len(window) if mode == "budget" else None,
            quality_target=limit if mode == "quality" else None,
            tie_tolerance=tie_tolerance,
            uncertainty=None if uncertainty is None else uncertainty.take(window),
        )
        plan[window] = solve(problem, solver).assignment
    return plan


# ------------------------------------------------------------------ whole evaluation


@dataclass
class Report:
    routers: dict[str, list[dict[str, float]]]
    aiq: dict[str, float]
    accuracy_at_cost_of: dict[str, dict[str, float | None]]
    single_models: dict[str, dict[str, float]]
    targets: dict[str, object]
    predictor_within_task_auc: dict[str, float]
    settings: dict[str, object]
    # The cascade's targets, and the answer scorer's and the predictor's within-task
    # AUC on the probe models' answers ("scorer", "predictor").
    cascade_targets: dict[str, object] = field(default_factory=dict)
    scorer_within_task_auc: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=float)


def quality_targets_for(scores: NDArray[np.float64], step: float = 0.05) -> tuple[float, ...]:
    """Quality targets to sweep, on multiples of `step`: from the least accurate
    model's accuracy to halfway from the most accurate one's to 1 (a router may beat
    it). Fixed targets fit one file's models only: those of a file whose models are
    all below them are out of reach, and each is then the same best-quality plan.
    On RouterBench: 0.50-0.95."""
    accuracy = np.nanmean(scores, axis=0)
    low = math.floor(float(np.nanmin(accuracy)) / step) * step
    high = min(math.ceil((float(np.nanmax(accuracy)) + 1.0) / 2 / step) * step, 1.0)
    return tuple(round(float(t), 2) for t in np.arange(low, high + step / 2, step))


def per_query_budgets(costs: NDArray[np.float64], levels: int) -> NDArray[np.float64]:
    """Budgets per query to sweep: `levels` from half the cheapest model's mean cost
    to the dearest's, each model's own, where the targets are read (between two
    levels the hull is a chord, below a steep curve), and twice the dearest's. The
    router must be measurable at the cheapest and the dearest model's own cost:
    below the one, and above the other, since a window of dearer than average
    queries cannot have the dearest model throughout at its mean cost (the
    router's points sit at what it really spent, so a budget it leaves unspent
    flatters nothing)."""
    model_costs = np.nanmean(costs, axis=0)
    spread = np.geomspace(model_costs.min() / 2, model_costs.max(), levels)
    return np.unique(np.concatenate([spread, model_costs, [2 * model_costs.max()]]))


Prediction = tuple[OutcomeTable, Estimates] | tuple[OutcomeTable, Estimates, CascadeSplit]


def score_splits(
    predictions: Iterable[Prediction],
    budgets: NDArray[np.float64],
    settings: EvaluationSettings,
    scorer_auc: dict[str, dict[str, float]] | None = None,
) -> tuple[dict[str, dict[float, Point]], dict[str, float]]:
    """Route each split's test prompts, given their estimates (and a fitted cascade),
    with every router. Returns every router's points and the estimates' within-task
    AUC; fills `scorer_auc` with the answer scorer's and the predictor's within-task
    AUC on the probe models' answers when there are cascades."""
    points: dict[str, dict[float, Point]] = {}
    predicted, outcomes, tasks, split_numbers = [], [], [], []
    on_probes: list[tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]] = []
    probe_tasks: list[str] = []
    probe_splits: list[int] = []
    for number, (test_part, estimates, *cascade) in enumerate(predictions):
        route_split(test_part, estimates, budgets, settings, points)
        predicted.append(estimates.quality)
        outcomes.append(test_part.scores)
        tasks.extend(test_part.eval_names)
        split_numbers.extend([number] * len(test_part))
        if cascade:
            posterior = route_cascade_split(
                test_part, estimates, cascade[0], budgets, settings, points
            )
            scored = np.flatnonzero(~np.isnan(test_part.scores).any(axis=1))
            scored = scored[arrival_order(len(scored), settings.seed)]
            panel = cascade[0].policy.panel
            on_probes.append(
                (posterior, estimates.quality[scored][:, panel], test_part.scores[scored][:, panel])
            )
            probe_tasks.extend(test_part.eval_names[i] for i in scored)
            probe_splits.extend([number] * len(scored))
    auc = within_task_auc(np.vstack(predicted), np.vstack(outcomes), tasks, split_numbers)
    if on_probes and scorer_auc is not None:
        stacked = [np.vstack(parts) for parts in zip(*on_probes, strict=True)]
        for name, values in (("scorer", stacked[0]), ("predictor", stacked[1])):
            scorer_auc[name] = within_task_auc(values, stacked[2], probe_tasks, probe_splits)
    return points, auc


def evaluate(
    train: OutcomeTable,
    test: OutcomeTable | None,
    embedder: Embedder,
    settings: EvaluationSettings,
    folds: int = 5,
    progress: Callable[[str], None] = lambda _: None,
) -> Report:
    """Train on `train` and route `test`; without `test`, cross-validate on `train`."""
    if not settings.quality_targets:
        settings = replace(settings, quality_targets=quality_targets_for(train.scores))
    train_vectors = embedder.embed(train.prompts)
    if test is not None:
        if test.models != train.models:
            raise ValueError("train and test files must hold the same models")
        splits = [(train, train_vectors, test, embedder.embed(test.prompts))]
    else:
        fold_of = group_folds(train.sample_ids, folds, settings.seed)
        splits = [
            (
                train.take(np.flatnonzero(fold_of != f)),
                train_vectors[fold_of != f],
                train.take(np.flatnonzero(fold_of == f)),
                train_vectors[fold_of == f],
            )
            for f in range(folds)
        ]
    blend_weights: list[float] = []
    panels: list[list[str]] = []
    with_cascade = settings.cascade

    def predictions() -> Iterator[Prediction]:
        for number, (fit_part, fit_vectors, test_part, test_vectors) in enumerate(splits, 1):
            estimates, weight = predict_split(
                fit_part, fit_vectors, test_part, test_vectors, embedder, settings.knn
            )
            blend_weights.append(weight)
            if with_cascade:
                policy = fit_split_cascade(fit_part, fit_vectors, embedder, settings)
                panels.append([train.models[j] for j in policy.panel])
                yield test_part, estimates, CascadeSplit(policy, test_vectors)
            else:
                yield test_part, estimates
            progress(
                f"split {number}/{len(splits)} routed ({len(test_part)} prompts, blend {weight})"
            )

    budgets = per_query_budgets(train.costs, settings.budget_levels)
    scorer_auc: dict[str, dict[str, float]] = {}
    points, auc = score_splits(predictions(), budgets, settings, scorer_auc)
    report = build_report(
        points,
        train.models,
        settings,
        blend_weights,
        cross_validated=test is None,
        predictor_auc=auc,
    )
    report.scorer_within_task_auc = scorer_auc
    report.settings["cascade_panel_per_split"] = panels
    return report


def build_report(
    points: dict[str, dict[float, Point]],
    models: list[str],
    settings: EvaluationSettings,
    blend_weights: list[float],
    cross_validated: bool,
    predictor_auc: dict[str, float],
) -> Report:
    setting_name = {
        OMNIROUTER_BUDGET: "budget_per_query_usd",
        OMNIROUTER_QUALITY: "target",
        GREEDY: "threshold",
        CASCADE: "budget_per_query_usd",
        CASCADE_QUALITY: "target",
    }
    routers = {
        name: [
            {
                setting_name.get(name, "setting"): p.setting,
                "accuracy": p.accuracy,
                "cost_usd": p.cost_usd,
                **(
                    {"probe_usd": p.probe_usd, "escalation_usd": p.escalation_usd}
                    if name in (CASCADE, CASCADE_QUALITY, AGREEMENT_RULE)
                    else {}
                ),
            }
            for p in sorted(by_setting.values(), key=lambda p: p.cost_usd)
        ]
        for name, by_setting in points.items()
    }
    curves = {name: [(p["cost_usd"], p["accuracy"]) for p in pts] for name, pts in routers.items()}
    single = {
        m: {
            "accuracy": routers[f"model:{m}"][0]["accuracy"],
            "cost_usd": routers[f"model:{m}"][0]["cost_usd"],
        }
        for m in models
    }
    cost_low = min(s["cost_usd"] for s in single.values())
    cost_high = max(s["cost_usd"] for s in single.values())
    aiqs = {name: aiq(curve, cost_low, cost_high) for name, curve in curves.items()}
    at_cost = {
        name: {m: accuracy_at_cost(curves[name], s["cost_usd"]) for m, s in single.items()}
        for name in CURVE_ROUTERS
        if name in curves
    }
    targets: dict[str, object] = {}
    if OMNIROUTER_BUDGET in curves:
        omni_at = at_cost[OMNIROUTER_BUDGET]
        margins = {
            m: None if (acc := omni_at[m]) is None else acc - s["accuracy"]
            for m, s in single.items()
        }
        best_model = max(single, key=lambda m: single[m]["accuracy"])
        reach = cost_to_reach(curves[OMNIROUTER_BUDGET], single[best_model]["accuracy"])
        targets = {
            "margin_over_each_model_at_its_cost": margins,
            "beats_every_model_by_1_point": all(
                v is not None and v >= 0.01 for v in margins.values()
            ),
            "best_model": best_model,
            "accuracy_at_35pct_of_best_model_cost": accuracy_at_cost(
                curves[OMNIROUTER_BUDGET], 0.35 * single[best_model]["cost_usd"]
            ),
            "task_oracle_accuracy_at_35pct_of_best_model_cost": accuracy_at_cost(
                curves[TASK_ORACLE], 0.35 * single[best_model]["cost_usd"]
            )
            if TASK_ORACLE in curves
            else None,
            "cost_share_to_reach_best_model_accuracy": None
            if reach is None
            else reach / single[best_model]["cost_usd"],
            "aiq_beats_greedy": aiqs[OMNIROUTER_BUDGET] > aiqs.get(GREEDY, float("inf")),
        }
    return Report(
        routers=routers,
        aiq=aiqs,
        accuracy_at_cost_of=at_cost,
        single_models=single,
        targets=targets,
        cascade_targets=cascade_targets(curves, aiqs, single, cost_low, cost_high),
        predictor_within_task_auc=predictor_auc,
        settings={
            "window_size": settings.window_size,
            "solver": settings.solver,
            "cross_validated": cross_validated,
            "knn": asdict(settings.knn),
            "blend_weight_per_split": blend_weights,
        },
    )


def cascade_targets(
    curves: dict[str, list[tuple[float, float]]],
    aiqs: dict[str, float],
    single: dict[str, dict[str, float]],
    cost_low: float,
    cost_high: float,
) -> dict[str, object]:
    """The cascade against the best model and the one-shot router: its accuracy at
    35% of the best model's cost, the share of that cost at which it reaches the
    best model's accuracy, and its hull's least margin over the one-shot router's
    (over the single models' cost range, where both have points)."""
    if CASCADE not in curves or OMNIROUTER_BUDGET not in curves:
        return {}
    best = max(single, key=lambda m: single[m]["accuracy"])
    best_cost, best_accuracy = single[best]["cost_usd"], single[best]["accuracy"]
    reach = cost_to_reach(curves[CASCADE], best_accuracy)
    cascade, omni = upper_hull(curves[CASCADE]), upper_hull(curves[OMNIROUTER_BUDGET])
    start = max(cost_low, cascade[0][0], omni[0][0])
    grid = np.linspace(start, cost_high, 500) if start < cost_high else np.array([cost_high])
    margins = [hull_accuracy(cascade, c) - hull_accuracy(omni, c) for c in grid]
    return {
        "accuracy_at_35pct_of_best_model_cost": accuracy_at_cost(curves[CASCADE], 0.35 * best_cost),
        "cost_share_to_reach_best_model_accuracy": None if reach is None else reach / best_cost,
        "aiq": aiqs[CASCADE],
        "aiq_one_shot": aiqs[OMNIROUTER_BUDGET],
        "least_margin_over_one_shot": float(min(margins)),
        "least_margin_at_cost_usd": float(grid[int(np.argmin(margins))]),
        "agreement_rule": curves.get(AGREEMENT_RULE, [None])[0],
    }


def summary_table(report: Report) -> str:
    lines = [f"{'router':42s} {'AIQ':>7} {'best acc':>9} {'at cost $':>10}"]
    for name, pts in sorted(report.routers.items(), key=lambda kv: -report.aiq[kv[0]]):
        best = max(pts, key=lambda p: p["accuracy"])
        lines.append(
            f"{name:42s} {report.aiq[name]:7.4f} {best['accuracy']:9.4f} {best['cost_usd']:10.4f}"
        )
    if OMNIROUTER_BUDGET in report.accuracy_at_cost_of:
        columns = {
            OMNIROUTER_BUDGET: "omni",
            GREEDY: "greedy",
            TASK_ORACLE: "task orc",
            ORACLE_BUDGET: "oracle",
            CASCADE: "cascade",
        }
        lines.append("")
        lines.append(
            f"{'at the cost of model':42s} {'model':>9}"
            + "".join(f" {title:>9}" for title in columns.values())
        )
        for model, single in report.single_models.items():
            at = [report.accuracy_at_cost_of.get(name, {}).get(model) for name in columns]
            lines.append(
                f"{model:42s} {single['accuracy']:9.4f}" + "".join(f" {_fmt(a):>9}" for a in at)
            )
    if report.predictor_within_task_auc:
        lines.append("")
        lines.append(
            "predictor within-task AUC (0.5 = no signal): "
            + ", ".join(
                f"{task} {auc:.3f}" for task, auc in report.predictor_within_task_auc.items()
            )
        )
    for name, aucs in report.scorer_within_task_auc.items():
        lines.append(
            f"{name} within-task AUC on the probes' answers: "
            + ", ".join(f"{task} {auc:.3f}" for task, auc in aucs.items())
        )
    if report.cascade_targets:
        lines.append("")
        for key, value in report.cascade_targets.items():
            lines.append(f"cascade {key}: {value}")
    if report.targets:
        lines.append("")
        for key, value in report.targets.items():
            if key != "margin_over_each_model_at_its_cost":
                lines.append(f"{key}: {value}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6))
    for name in (*CURVE_ROUTERS, AGREEMENT_RULE, "random", "cheapest"):
        if name not in report.routers:
            continue
        pts = report.routers[name]
        style = "-o" if name in CURVE_ROUTERS else "s"
        axes.plot(
            [p["cost_usd"] for p in pts],
            [p["accuracy"] for p in pts],
            style,
            label=name,
            markersize=4,
        )
    for model, single in report.single_models.items():
        axes.scatter(single["cost_usd"], single["accuracy"], marker="x", color="grey")
        axes.annotate(model.split("/")[-1], (single["cost_usd"], single["accuracy"]), fontsize=7)
    oracle = report.routers["oracle"][0]
    axes.scatter(
        oracle["cost_usd"],
        oracle["accuracy"],
        marker="*",
        s=150,
        color="gold",
        label="oracle",
        zorder=5,
    )
    axes.set_xscale("log")
    axes.set_xlabel("total cost of the routed queries (USD, log scale)")
    axes.set_ylabel("accuracy")
    axes.set_title("Cost vs quality: routers and single models")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(report: Report, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "report.json"
    report_path.write_text(report.to_json())
    plot_path = out_dir / "cost_quality.png"
    plot(report, plot_path)
    return [report_path, plot_path]
