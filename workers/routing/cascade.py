"""The answer-aware cascade for one window: answer directly, or probe with a cheap
panel and escalate only where the probes' answers look wrong.

Stage 1 is the window optimiser with extra options per query: besides answering
with model j, "probe with the panel, accept the best probe answer unless its
posterior falls below threshold t, else escalate to model e", one option per
(t, e). An option is priced from stored outcomes: its quality is what that
policy realised on the query's nearest stored queries (out-of-fold posteriors,
the retrieval store's k-NN with its cluster priors, as the predictor does for a
model), its cost the panel's predicted cost plus the escalation model's cost
times the share of those neighbours that were escalated.

Stage 2, once the probes have answered: the scorer's posteriors give, for each
probed query, the quality of accepting (the best probe answer's P(good)) and of
each escalation model; the same optimiser chooses under what is left of the
window's budget (or so the window still meets its quality target). Budget
accounting covers direct answers, probes and escalations together.

The panel is chosen from history: among pairs of the pool's cheapest models, the
one whose answers, ranked by the scorer, gain most from escalating the doubtful
ones to the most accurate model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

from workers.routing.answer_scorer import AnswerScorer, ProbeAnswers, best_probe, logit
from workers.routing.clusters import QueryClusters
from workers.routing.embedder import Embedder
from workers.routing.optimizer import Method, Mode, WindowPlan, WindowProblem, solve
from workers.routing.panel_capacity import solve_with_probes
from workers.routing.predictor import HybridPredictor, KnnSettings
from workers.routing.store import RetrievalStore

# Pairs among this many of the cheapest models are candidate panels.
PANEL_CANDIDATES = 5
# Shares of the stored queries escalated, read off their posteriors, that set the
# thresholds of the probe options (0: never escalate).
ESCALATION_SHARES = (0.0, 0.15, 0.3, 0.5, 0.7)
NEVER = -1  # an escalation "model" meaning: accept the best probe answer
# Inverse regularisations the option pricer chooses from, per option, by the log
# loss on held-out folds of its stored queries (PRICER_FOLDS). The solver picks, per
# query, the option that reads highest for its price, so every option's noise is
# someone's overrated pick: 1.0 for all of them trailed the one-shot router by up
# to 0.34 points on RouterBench, 0.03 for all by 0.22 (docs/history-cascade.md, second round).
PRICER_CS = (0.01, 0.03, 0.1, 0.3, 1.0)
PRICER_FOLDS = 3


@dataclass(frozen=True)
class ProbeOption:
    threshold: float  # escalate when the best probe answer's P(good) is below it
    escalate_to: int  # model index, or NEVER


@dataclass
class CascadePolicy:
    """What the cascade learned from stored outcomes."""

    panel: list[int]
    scorer: AnswerScorer
    options: list[ProbeOption]
    pricer: OptionPricer
    # The stored queries' clusters (workers/routing/clusters.py), for new queries.
    clustering: QueryClusters
    # Platt scaling of the best probe answer's posterior, fitted on held-out outcomes:
    # the largest of several noisy estimates runs high (the winner's curse).
    accept_platt: tuple[float, float] = (1.0, 0.0)

    def accept_quality(self, posterior: NDArray[np.float64]) -> NDArray[np.float64]:
        """P(the best probe answer is good), calibrated."""
        slope, intercept = self.accept_platt
        best = logit(posterior[:, self.panel].max(axis=1))
        return np.asarray(1.0 / (1.0 + np.exp(-(slope * best + intercept))), dtype=np.float64)

    def clusters(self, vectors: NDArray[np.float32]) -> NDArray[np.int64]:
        return self.clustering.assign(vectors)

    @property
    def thresholds(self) -> list[float]:
        return sorted({o.threshold for o in self.options})


# ------------------------------------------------------------------------ training


def accepted_correct(
    posterior: NDArray[np.float64], truth: NDArray[np.float64], panel: Sequence[int]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The best probe answer's posterior and whether it was right (NaN: unknown)."""
    chosen = best_probe(np.nan_to_num(posterior, nan=-1.0), panel)
    rows = np.arange(len(truth))
    return posterior[rows, chosen], truth[rows, chosen]


def escalation_gain(
    posterior: NDArray[np.float64], truth: NDArray[np.float64], panel: Sequence[int], target: int
) -> float:
    """Mean accuracy over every escalated share from 0 to 1, escalating the queries
    whose accepted answer is least likely good first: high when the panel is often
    right and the scorer knows when it is not."""
    score, correct = accepted_correct(posterior, truth, panel)
    known = ~np.isnan(correct) & ~np.isnan(truth[:, target]) & ~np.isnan(score)
    if not known.any():
        return float("-inf")
    order = np.argsort(score[known], kind="stable")
    accept, escalate = correct[known][order], truth[known, target][order]
    n = len(order)
    # Escalating the first f: sum of escalate[:f] + sum of accept[f:].
    escalated = np.concatenate([[0.0], np.cumsum(escalate)])
    accepted = np.concatenate([[0.0], np.cumsum(accept[::-1])])[::-1]
    return float(np.mean((escalated + accepted) / n))


def cheapest_models(costs: NDArray[np.float64], k: int) -> list[int]:
    """The k models of least mean recorded cost (columns of `costs`), cheapest first."""
    return [int(j) for j in np.argsort(np.nanmean(costs, axis=0), kind="stable")[:k]]


def candidate_panels(
    costs: NDArray[np.float64], probe_models: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """The pairs among the PANEL_CANDIDATES cheapest of the models that may probe
    (`probe_models`; None: all)."""
    cheapest = eligible_cheapest(costs, probe_models)[:PANEL_CANDIDATES]
    return [(min(a, b), max(a, b)) for a, b in itertools.combinations(cheapest, 2)]


def eligible_cheapest(costs: NDArray[np.float64], probe_models: Sequence[int] | None) -> list[int]:
    """The models that may probe, cheapest first."""
    ordered = cheapest_models(costs, costs.shape[1])
    return ordered if probe_models is None else [j for j in ordered if j in probe_models]


def choose_panel(
    responses: Sequence[Sequence[str | None]],
    predicted: NDArray[np.float64],
    clusters: NDArray[np.int64],
    n_clusters: int,
    truth: NDArray[np.float64],
    costs: NDArray[np.float64],
    probe_models: Sequence[int] | None = None,
) -> list[int]:
    """The pair of cheap models whose scored answers gain most from escalation to the
    most accurate model (`escalation_gain`, on held-out posteriors); `responses` are
    every model's, (n_queries, n_models). No pair leaves the target out (a pool of
    two models): the cheapest other model alone, the classic two-model cascade
    (probe with the cheap model, escalate its doubtful answers to the accurate one),
    which keeps the probe's saving; no other model: no panel (fit_cascade refuses).
    Only `probe_models` may probe (None: any; the router leaves capped models out,
    since a probe takes a slot of every panel model and their slots are better
    kept for answers)."""
    target = int(np.nanargmax(np.nanmean(truth, axis=0)))
    others = [j for j in eligible_cheapest(costs, probe_models) if j != target]
    best: tuple[float, list[int]] = (float("-inf"), others[:1])
    for panel in candidate_panels(costs, probe_models):
        if target in panel:
            continue
        answers = ProbeAnswers.of([[row[j] for j in panel] for row in responses])
        scorer = AnswerScorer(panel, truth.shape[1], n_clusters).fit(
            answers, predicted, clusters, truth, models=[*panel, target]
        )
        gain = escalation_gain(scorer.held_out, truth, panel, target)
        if gain > best[0]:
            best = (gain, list(panel))
    return best[1]


def option_outcomes(
    posterior: NDArray[np.float64],
    truth: NDArray[np.float64],
    panel: Sequence[int],
    options: Sequence[ProbeOption],
) -> NDArray[np.float64]:
    """Per stored query, for each threshold whether it would have been escalated, then
    for each option whether its final answer was right (NaN: unknown)."""
    score, correct = accepted_correct(posterior, truth, panel)
    thresholds = sorted({o.threshold for o in options})
    escalated = [(score < t).astype(float) for t in thresholds]
    final = [
        correct
        if o.escalate_to == NEVER
        else np.where(score < o.threshold, truth[:, o.escalate_to], correct)
        for o in options
    ]
    return np.column_stack([*escalated, *final])


def escalation_targets(
    truth: NDArray[np.float64], costs: NDArray[np.float64], panel: Sequence[int]
) -> list[int]:
    """The models worth escalating to: outside the panel, and not dominated by another
    such model that was, on stored queries, at least as accurate for at most the
    price (and better in one). Each target adds a column per threshold to every
    window, and the solver picks whichever column reads highest for the price:
    columns that could never be right only add estimates to be overrated."""
    accuracy, price = np.nanmean(truth, axis=0), np.nanmean(costs, axis=0)
    others = [j for j in range(truth.shape[1]) if j not in panel]
    return [
        j
        for j in others
        if not any(
            accuracy[k] >= accuracy[j]
            and price[k] <= price[j]
            and (accuracy[k] > accuracy[j] or price[k] < price[j])
            for k in others
        )
    ]


def make_options(held_out_score: NDArray[np.float64], targets: Sequence[int]) -> list[ProbeOption]:
    known = held_out_score[~np.isnan(held_out_score)]
    options = [ProbeOption(-np.inf, NEVER)]
    for share in ESCALATION_SHARES:
        if share <= 0 or not len(known):
            continue
        threshold = float(np.quantile(known, share))
        options += [ProbeOption(threshold, j) for j in targets]
    return options


class NoPanel(ValueError):
    """No panel to probe with: none configured and no model fit to choose."""


def fit_cascade(
    query_ids: Sequence[str],
    vectors: NDArray[np.float32],
    responses: Sequence[Sequence[str | None]],
    predicted: NDArray[np.float64],
    truth: NDArray[np.float64],
    costs: NDArray[np.float64],
    panel: Sequence[int] | None = None,
    probe_models: Sequence[int] | None = None,
) -> CascadePolicy:
    """Learn the cascade from stored queries with every model's outcome and response
    (`predicted`: the one-shot predictor's quality for them, from a predictor that
    did not see them). `panel`: the probe models, else chosen (`choose_panel`) among
    `probe_models` (None: any)."""
    n_models = truth.shape[1]
    clustering = RetrievalStore([str(j) for j in range(n_models)], vectors.shape[1])
    clustering.add_table(list(query_ids), vectors, truth, costs)
    clusters = clustering.clusters.assign(vectors)
    n_clusters = clustering.clusters.n_clusters
    if panel is None:
        panel = choose_panel(responses, predicted, clusters, n_clusters, truth, costs, probe_models)
    panel = list(panel)
    if not panel or len(panel) >= n_models:
        raise NoPanel(
            f"a cascade needs a panel of 1 to {n_models - 1} of its {n_models} model(s), "
            f"got {panel}: one model at least to probe with (a chosen panel takes no "
            "model capped in ROUTER_MODEL_CAPACITIES), one to escalate to"
        )
    answers = ProbeAnswers.of([[row[j] for j in panel] for row in responses])
    scorer = AnswerScorer(panel, n_models, n_clusters).fit(answers, predicted, clusters, truth)
    score, correct = accepted_correct(scorer.held_out, truth, panel)
    options = make_options(score, escalation_targets(truth, costs, panel))
    outcomes = option_outcomes(scorer.held_out, truth, panel, options)
    pricer = OptionPricer(n_clusters).fit(predicted, clusters, outcomes)
    return CascadePolicy(panel, scorer, options, pricer, clustering.clusters, platt(score, correct))


class OptionPricer:
    """What an option realised on stored queries like this one: one logistic
    regression per column of `option_outcomes`, on the query's cluster and the
    one-shot predictor's quality of every model (which tells kinds of query apart
    within a coarse cluster). Regression, not neighbours' means: on RouterBench the
    k-NN means of the realised outcomes ran 4 points high on ARC (easy questions
    are more often someone's nearest neighbour)."""

    def __init__(self, n_clusters: int) -> None:
        self.n_clusters = max(1, n_clusters)
        self.columns: list[LogisticRegressionCV | float] = []

    def _features(
        self, predicted: NDArray[np.float64], clusters: NDArray[np.int64]
    ) -> NDArray[np.float64]:
        onehot = np.eye(self.n_clusters)[np.clip(clusters, 0, self.n_clusters - 1)]
        return np.hstack([onehot, logit(predicted)])

    def fit(
        self,
        predicted: NDArray[np.float64],
        clusters: NDArray[np.int64],
        outcomes: NDArray[np.float64],
    ) -> OptionPricer:
        x = self._features(predicted, clusters)
        self.columns = []
        for k in range(outcomes.shape[1]):
            known = ~np.isnan(outcomes[:, k])
            y = outcomes[known, k] >= 0.5
            if y.all() or not y.any():
                self.columns.append(float(y.mean()) if y.size else 0.5)
                continue
            regression = LogisticRegressionCV(
                Cs=list(PRICER_CS),
                l1_ratios=(0.0,),  # plain L2, as before
                cv=PRICER_FOLDS,
                scoring="neg_log_loss",
                max_iter=2000,
                use_legacy_attributes=False,
            )
            self.columns.append(regression.fit(x[known], y))
        return self

    def predict(
        self, predicted: NDArray[np.float64], clusters: NDArray[np.int64]
    ) -> NDArray[np.float64]:
        x = self._features(predicted, clusters)
        return np.column_stack(
            [
                c.predict_proba(x)[:, 1]
                if isinstance(c, LogisticRegressionCV)
                else np.full(len(x), c)
                for c in self.columns
            ]
        )


def platt(score: NDArray[np.float64], correct: NDArray[np.float64]) -> tuple[float, float]:
    """Slope and intercept on logit(score) that best predict `correct` (identity
    when either class is missing)."""
    known = ~np.isnan(score) & ~np.isnan(correct)
    y = correct[known] >= 0.5
    if y.all() or not y.any():
        return (1.0, 0.0)
    fitted = LogisticRegression(C=1e4, max_iter=1000).fit(logit(score[known])[:, None], y)
    return float(fitted.coef_[0, 0]), float(fitted.intercept_[0])


def group_folds(sample_ids: Sequence[str], folds: int, seed: int) -> NDArray[np.int64]:
    """Fold of each row; rows of the same sample id share a fold (no leakage)."""
    distinct = sorted(set(sample_ids))
    order = np.random.default_rng(seed).permutation(len(distinct))
    fold_of = {distinct[i]: rank % folds for rank, i in enumerate(order)}
    return np.array([fold_of[s] for s in sample_ids], dtype=np.int64)


def out_of_fold_quality(
    models: Sequence[str],
    sample_ids: Sequence[str],
    vectors: NDArray[np.float32],
    scores: NDArray[np.float64],
    costs: NDArray[np.float64],
    prompt_chars: Sequence[int],
    embedder: Embedder,
    knn: KnnSettings,
    folds: int,
    seed: int,
) -> NDArray[np.float64]:
    """The one-shot predictor's quality for each stored query from a predictor that
    did not see it (`folds` groups): what the scorer learns beside the answers,
    as a router has its prediction beside a new query's probes."""
    fold_of = group_folds(sample_ids, folds, seed)
    quality = np.full(scores.shape, 0.5)
    for f in range(folds):
        fit, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        if not len(fit) or not len(held):
            continue
        store = RetrievalStore(models, vectors.shape[1])
        store.add_table(
            [sample_ids[i] for i in fit.tolist()], vectors[fit], scores[fit], costs[fit]
        )
        predictor = HybridPredictor(embedder, store, knn=knn)
        predictor.fit()
        chars = [prompt_chars[i] for i in held.tolist()]
        estimates = predictor.predict_embedded(vectors[held], chars)
        quality[held] = estimates.quality
    return quality


# ---------------------------------------------------------------------- stage one


@dataclass(frozen=True)
class OptionMatrices:
    quality: NDArray[np.float64]  # (n_queries, n_options)
    cost: NDArray[np.float64]
    probe_cost: NDArray[np.float64]  # (n_queries,)


def price_options(
    policy: CascadePolicy,
    clusters: NDArray[np.int64],
    quality: NDArray[np.float64],
    cost: NDArray[np.float64],
) -> OptionMatrices:
    """Expected quality and cost of every probe option for each query; `clusters` are
    the queries' (`policy.clusters`), `quality` and `cost` the one-shot predictions
    of each model (n_queries, n_models)."""
    expected = policy.pricer.predict(quality, clusters)
    thresholds = policy.thresholds
    escalated, realised = expected[:, : len(thresholds)], expected[:, len(thresholds) :]
    probe_cost = cost[:, policy.panel].sum(axis=1)
    option_cost = np.column_stack(
        [
            probe_cost
            if o.escalate_to == NEVER
            else probe_cost + escalated[:, thresholds.index(o.threshold)] * cost[:, o.escalate_to]
            for o in policy.options
        ]
    )
    return OptionMatrices(realised, option_cost, probe_cost)


def solve_first_stage(
    quality: NDArray[np.float64],
    cost: NDArray[np.float64],
    options: OptionMatrices,
    mode: Mode,
    limit: float,
    solver: Method,
    tie_tolerance: float = 0.0,
    time_limit_seconds: float = 2.0,
    allowed: NDArray[np.bool_] | None = None,
) -> WindowPlan:
    """The first stage's plan: per query a column, below n_models a model answering
    directly, from n_models on the probe option `column - n_models`; `limit` is the
    window's budget (USD) or the quality target. `allowed`: the pairs and probe
    options each query may take, (n_queries, n_models + options)."""
    problem = first_stage_problem(quality, cost, options, mode, limit, tie_tolerance, allowed)
    return plan_first_stage(problem, quality.shape[1], solver, time_limit_seconds)


def first_stage_problem(
    quality: NDArray[np.float64],
    cost: NDArray[np.float64],
    options: OptionMatrices,
    mode: Mode,
    limit: float,
    tie_tolerance: float = 0.0,
    allowed: NDArray[np.bool_] | None = None,
    capacities: Sequence[int | None] | None = None,
    fallback_model: int | None = None,
) -> WindowProblem:
    """The first stage's window: the models' columns, then the probe options'.
    `capacities` (one per model) bound the models' direct answers; a probe option
    has no column capacity of its own: the slots it takes of the panel's models
    are kept by `plan_first_stage`, and its escalations are bounded in their own
    windows."""
    n_options = options.quality.shape[1]
    return _window(
        np.hstack([quality, options.quality]),
        np.hstack([cost, options.cost]),
        mode,
        limit,
        tie_tolerance,
        allowed,
        None if capacities is None else (*capacities, *([None] * n_options)),
        fallback_model,
    )


def plan_first_stage(
    problem: WindowProblem,
    n_models: int,
    solver: Method,
    time_limit_seconds: float = 2.0,
    panel: Sequence[int] = (),
) -> WindowPlan:
    """Plan a first-stage window (`first_stage_problem`; its first `n_models` columns
    answer directly). The direct-only window is solved too, and kept unless the
    plan with probe options uses some and is better by its own estimates (more
    expected quality in budget mode; in quality mode, reaching the target at less
    cost, or reaching it where the direct plan cannot). A probe takes a slot of
    every `panel` model: where those are capped, the plan with probe options keeps
    that too (workers/routing/panel_capacity.py).
    Probe columns left unchosen still change the solve (the tie penalty is relative
    to a query's dearest option, the fast solver's steps to the mean cost): a
    cascade that probes nothing must route exactly as the one-shot router does."""
    direct_problem = direct_only(problem, n_models)
    direct = solve(direct_problem, solver, time_limit_seconds)
    with_probes = solve_with_probes(
        problem, n_models, panel, solver, time_limit_seconds, direct_problem.capacity_array
    )
    if with_probes is None:  # no plan with probes keeps the panel's caps
        return direct
    pays = probes_pay(problem, with_probes, direct_problem, direct, n_models)
    return with_probes if pays else direct


def direct_only(problem: WindowProblem, n_models: int) -> WindowProblem:
    """A first-stage window without its probe options: its first `n_models` columns."""
    limit = problem.window_budget_usd if problem.mode == "budget" else problem.quality_target
    assert limit is not None
    return _window(
        problem.quality[:, :n_models],
        problem.cost[:, :n_models],
        problem.mode,
        limit,
        problem.tie_tolerance,
        problem.permitted[:, :n_models],
        None if problem.capacities is None else problem.capacities[:n_models],
        problem.fallback_model,
    )


def _window(
    quality: NDArray[np.float64],
    cost: NDArray[np.float64],
    mode: Mode,
    limit: float,
    tie_tolerance: float,
    allowed: NDArray[np.bool_] | None = None,
    capacities: Sequence[int | None] | None = None,
    fallback_model: int | None = None,
) -> WindowProblem:
    return WindowProblem(
        quality,
        cost,
        mode,
        window_budget_usd=limit if mode == "budget" else None,
        quality_target=limit if mode == "quality" else None,
        capacities=None if capacities is None else tuple(capacities),
        fallback_model=fallback_model,
        tie_tolerance=tie_tolerance,
        allowed=allowed,
    )


def probes_pay(
    problem: WindowProblem,
    with_probes: WindowPlan,
    direct_problem: WindowProblem,
    direct: WindowPlan,
    n_models: int,
) -> bool:
    """Does the plan with probe options probe at all, and beat the direct-only plan
    (quality mode: reach the target, at less cost or where the direct plan cannot;
    where neither does, more quality)?
    Each plan is checked against its own window, not trusted by its status: a solve
    out of time may return the fast path's plan, which can miss the target, and a
    plan whose probes were limited for the panel's caps may miss the budget."""
    if not (with_probes.assignment >= n_models).any():
        return False
    if problem.mode == "budget":
        # Never over a budget the direct plan keeps (a plan whose probes were
        # limited, panel_capacity.py, may not keep it).
        if direct_problem.meets_limit(direct.assignment) and not problem.meets_limit(
            with_probes.assignment
        ):
            return False
        return with_probes.total_quality > direct.total_quality
    direct_reaches = direct_problem.meets_limit(direct.assignment)
    if not problem.meets_limit(with_probes.assignment):
        # Neither reaches the target: the window's plan is its best quality (the
        # status says so), which probing may be.
        return not direct_reaches and with_probes.total_quality > direct.total_quality
    return not direct_reaches or with_probes.total_cost_usd < direct.total_cost_usd


# ---------------------------------------------------------------------- stage two


def escalation_limit(
    mode: Mode,
    limit: float,
    spent_usd: float,
    direct_quality: float,
    window_queries: int,
    probed: int,
) -> float:
    """What the escalation stage may use: the window's budget less what direct answers
    and probes spent (never below 0), or the mean quality the probed queries must
    reach for the whole window to meet its target."""
    if mode == "budget":
        return max(limit - spent_usd, 0.0)
    needed = limit * window_queries - direct_quality
    return needed / probed if probed else 0.0


def plan_escalations(
    posterior: NDArray[np.float64],
    accept_quality: NDArray[np.float64],
    cost: NDArray[np.float64],
    panel: Sequence[int],
    mode: Mode,
    limit: float,
    solver: Method,
    tie_tolerance: float = 0.0,
    allowed: NDArray[np.bool_] | None = None,
    capacities: Sequence[int | None] | None = None,
) -> NDArray[np.int64]:
    """For each probed query, NEVER (accept its best probe answer, P(good)
    `accept_quality`) or the model to escalate to (P(good) its `posterior`); `limit`
    from `escalation_limit`. A model of the panel is no escalation (its answer is
    in hand); `allowed`: the (query, model) pairs the hints allow; `capacities`
    (one per model, None: unlimited): the most escalations each model may take
    (accepting is never capped, so every window fits)."""
    accept_quality = accept_quality[:, None]
    others = [j for j in range(posterior.shape[1]) if j not in panel]
    problem = WindowProblem(
        np.hstack([accept_quality, posterior[:, others]]),
        np.hstack([np.zeros_like(accept_quality), cost[:, others]]),
        mode,
        window_budget_usd=limit if mode == "budget" else None,
        quality_target=limit if mode == "quality" else None,
        capacities=None if capacities is None else (None, *(capacities[j] for j in others)),
        tie_tolerance=tie_tolerance,
        allowed=None
        if allowed is None
        else np.hstack([np.ones_like(accept_quality, dtype=bool), allowed[:, others]]),
    )
    choice = solve(problem, solver).assignment
    return np.where(choice == 0, NEVER, np.asarray([NEVER, *others])[choice]).astype(np.int64)


# ------------------------------------------------------------------ one window


@dataclass(frozen=True)
class CascadeWindow:
    """How one window went: who gave each query's final answer, and the spend."""

    final_model: NDArray[np.int64]  # (n_queries,)
    probed: NDArray[np.bool_]
    escalated: NDArray[np.bool_]
    direct_usd: float
    probe_usd: float
    escalation_usd: float

    @property
    def total_usd(self) -> float:
        return self.direct_usd + self.probe_usd + self.escalation_usd


def run_window(
    policy: CascadePolicy,
    quality: NDArray[np.float64],
    cost: NDArray[np.float64],
    vectors: NDArray[np.float32],
    responses: Sequence[Sequence[str | None]],
    realised_cost: NDArray[np.float64],
    mode: Mode,
    limit: float,
    solver: Method = "fast",
    tie_tolerance: float = 0.0,
    options: OptionMatrices | None = None,
    posterior: NDArray[np.float64] | None = None,
) -> CascadeWindow:
    """Both stages on one window whose answers are known in advance (recorded
    outcomes, offline): `responses` and `realised_cost` are every model's. `limit`
    is the window's budget or its quality target. `options` (`price_options`) and
    `posterior` (the scorer's, of every query as if probed) may be given when
    computed for many windows at once; they depend on the query alone."""
    n, n_models = quality.shape
    rows = np.arange(n)
    if options is None:
        options = price_options(policy, policy.clusters(vectors), quality, cost)
    column = solve_first_stage(
        quality, cost, options, mode, limit, solver, tie_tolerance
    ).assignment
    probed = column >= n_models
    direct_usd = float(realised_cost[rows[~probed], column[~probed]].sum())
    probe_usd = float(realised_cost[np.ix_(rows[probed], policy.panel)].sum())
    final = column.copy()
    escalated = np.zeros(n, dtype=bool)
    escalation_usd = 0.0
    if probed.any():
        probe_rows = rows[probed]
        if posterior is None:
            answers = ProbeAnswers.of([[responses[i][j] for j in policy.panel] for i in probe_rows])
            probed_posterior = policy.scorer.posterior(
                answers, quality[probe_rows], policy.clusters(vectors[probe_rows])
            )
        else:
            probed_posterior = posterior[probe_rows]
        direct_quality = float(quality[rows[~probed], column[~probed]].sum())
        budget_left = escalation_limit(
            mode, limit, direct_usd + probe_usd, direct_quality, n, len(probe_rows)
        )
        choice = plan_escalations(
            probed_posterior,
            policy.accept_quality(probed_posterior),
            cost[probe_rows],
            policy.panel,
            mode,
            budget_left,
            solver,
            tie_tolerance,
        )
        accepted = best_probe(probed_posterior, policy.panel)
        final[probe_rows] = np.where(choice == NEVER, accepted, choice)
        escalated[probe_rows] = choice != NEVER
        escalation_usd = float(
            realised_cost[probe_rows[choice != NEVER], choice[choice != NEVER]].sum()
        )
    return CascadeWindow(final, probed, escalated, direct_usd, probe_usd, escalation_usd)
