"""The cascade: the panel from history, the probe option in the window optimiser, the
escalation stage under what is left of the budget, and the spend across stages."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest

from workers.routing import cascade as cascade_module
from workers.routing.answer_scorer import ProbeAnswers
from workers.routing.cascade import (
    NEVER,
    CascadePolicy,
    NoPanel,
    OptionMatrices,
    OptionPricer,
    escalation_gain,
    escalation_limit,
    first_stage_problem,
    fit_cascade,
    plan_escalations,
    plan_first_stage,
    price_options,
    run_window,
    solve_first_stage,
)
from workers.routing.cascade_window import EscalationLimit, _escalation_choice, forced_escalation
from workers.routing.exploration import explore_and_solve
from workers.routing.optimizer import Method, Mode, WindowPlan, WindowProblem, solve

# Models: two cheap probes (0, 1) and a dear, accurate one (2); costs per query.
COSTS = np.array([1.0, 1.2, 20.0])


def recorded(n: int, seed: int) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """Responses and outcomes of the three models: each cheap model answers right
    ("x") 70% of the time, wrong ("y" or "z") otherwise; the dear model 95%."""
    rng = np.random.default_rng(seed)
    right = np.column_stack([rng.random(n) < 0.7, rng.random(n) < 0.7, rng.random(n) < 0.95])
    wrong = rng.choice(["y", "z"], size=(n, 3))
    responses = [[("x" if right[i, j] else wrong[i, j]) for j in range(3)] for i in range(n)]
    return responses, right.astype(float), np.tile(COSTS, (n, 1))


def unit_vectors(n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def policy() -> CascadePolicy:
    n = 400
    responses, truth, costs = recorded(n, seed=1)
    predicted = np.tile([0.7, 0.7, 0.95], (n, 1))
    ids = [f"q{i}" for i in range(n)]
    return fit_cascade(ids, unit_vectors(n, 1), responses, predicted, truth, costs)


def test_the_panel_is_chosen_from_history_not_named(policy: CascadePolicy) -> None:
    # The dear model is the escalation target, so the probes are the two cheap ones.
    assert sorted(policy.panel) == [0, 1]


def test_no_option_escalates_to_a_model_another_beats_for_less() -> None:
    """A fourth model, dearer than the accurate one and worse: no probe option should
    escalate to it (a column that can never be right, only overrated)."""
    n = 300
    responses, truth, costs = recorded(n, seed=2)
    rng = np.random.default_rng(3)
    truth = np.column_stack([truth, rng.random(n) < 0.8])
    costs = np.column_stack([costs, np.full(n, 30.0)])
    responses = [[*row, "x"] for row in responses]
    predicted = np.tile([0.7, 0.7, 0.95, 0.8], (n, 1))
    ids = [f"q{i}" for i in range(n)]
    fitted = fit_cascade(ids, unit_vectors(n, 2), responses, predicted, truth, costs, panel=[0, 1])
    targets = {o.escalate_to for o in fitted.options}
    assert targets == {NEVER, 2}


def test_option_prices_learn_no_spread_from_noise() -> None:
    """Outcomes unrelated to the features: every query's price should be about the
    option's mean. The solver takes, per query, the option that reads highest, so
    spread learned from noise becomes overrated picks."""
    rng = np.random.default_rng(0)
    n = 600
    predicted = rng.uniform(0.2, 0.9, size=(n, 4))
    outcomes = (rng.random((n, 2)) < 0.7).astype(float)
    pricer = OptionPricer(3).fit(predicted, rng.integers(0, 3, size=n), outcomes)
    prices = pricer.predict(rng.uniform(0.2, 0.9, size=(200, 4)), rng.integers(0, 3, size=200))
    # A fixed C=1 spread them by 0.04 on average here.
    assert prices.std(axis=0).mean() < 0.03
    assert np.allclose(prices.mean(axis=0), outcomes.mean(axis=0), atol=0.05)


def test_option_prices_keep_a_real_signal() -> None:
    rng = np.random.default_rng(1)
    n = 300
    predicted = rng.uniform(0.1, 0.9, size=(n, 2))
    outcomes = (rng.random((n, 1)) < predicted[:, :1]).astype(float)
    pricer = OptionPricer(1).fit(predicted, np.zeros(n, dtype=np.int64), outcomes)
    low, high = pricer.predict(np.array([[0.15, 0.5], [0.85, 0.5]]), np.zeros(2, dtype=np.int64))
    assert high[0] - low[0] > 0.4


def test_escalation_gain_rewards_a_scorer_that_ranks_wrong_answers_first() -> None:
    truth = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    right_order = np.array([[0.9, 0.1, 0.5], [0.1, 0.1, 0.5]])
    # Escalate nothing: 1/2; the wrong answer first: 2/2; both: 2/2.
    assert escalation_gain(right_order, truth, [0, 1], 2) == pytest.approx((0.5 + 1 + 1) / 3)
    wrong_order = np.array([[0.1, 0.1, 0.5], [0.9, 0.1, 0.5]])
    assert escalation_gain(wrong_order, truth, [0, 1], 2) == pytest.approx((0.5 + 0.5 + 1) / 3)


def test_probe_options_that_do_not_pay_leave_the_one_shot_plan_unchanged() -> None:
    """Dearer and worse than every model: no query should probe, and the plan must be
    the direct-only window's (unchosen columns used to move the tie penalty, relative
    to a query's dearest option, and the fast solver's steps)."""
    quality = np.array(
        [[0.31, 0.31, 0.84], [0.3, 0.5, 0.59], [0.57, 0.78, 0.87], [0.38, 0.49, 0.85],
         [0.41, 0.68, 0.78], [0.43, 0.61, 0.79], [0.35, 0.47, 0.63], [0.62, 0.83, 0.85]]
    )  # fmt: skip
    cost = np.array(
        [[0.6, 2.3, 2.9], [0.8, 2.0, 2.9], [0.7, 1.3, 1.5], [1.0, 2.5, 2.7],
         [0.4, 0.8, 1.4], [0.1, 0.2, 0.9], [0.8, 2.6, 2.8], [1.5, 2.6, 2.8]]
    )  # fmt: skip
    option_quality = np.array(
        [[0.17, 0.1], [0.18, 0.15], [0.14, 0.11], [0.09, 0.02],
         [0.08, 0.17], [0.0, 0.09], [0.04, 0.07], [0.15, 0.01]]
    )  # fmt: skip
    option_cost = np.array(
        [[3.6, 3.6], [3.4, 3.9], [1.9, 3.3], [3.2, 4.7],
         [1.5, 2.2], [1.3, 2.3], [2.8, 3.8], [4.5, 4.3]]
    )  # fmt: skip
    options = OptionMatrices(option_quality, option_cost, option_cost[:, 0])
    direct = solve(
        WindowProblem(quality, cost, "budget", window_budget_usd=17.8, tie_tolerance=0.005),
        "fast",
    ).assignment
    column = solve_first_stage(quality, cost, options, "budget", 17.8, "fast", 0.005).assignment
    assert (column < 3).all()
    assert column.tolist() == direct.tolist()


def test_the_probe_option_is_chosen_where_it_pays_and_keeps_the_budget() -> None:
    quality = np.array([[0.6, 0.95]] * 4)
    cost = np.array([[1.0, 10.0]] * 4)
    # Probe for 2, escalate a fifth of the time to the dear model: 4 expected, 0.9.
    options = OptionMatrices(np.full((4, 1), 0.9), np.full((4, 1), 4.0), np.full(4, 2.0))
    column = solve_first_stage(quality, cost, options, "budget", 16.0, "exact").assignment
    assert (column == 2).all()
    # With less, some queries go to the cheap model directly; the expected spend,
    # escalations included, stays within the budget.
    column = solve_first_stage(quality, cost, options, "budget", 10.0, "exact").assignment
    spend = np.hstack([cost, options.cost])[np.arange(4), column].sum()
    assert spend <= 10.0 and (column == 2).sum() == 2
    # Quality mode: the cheapest plan that reaches the target.
    column = solve_first_stage(quality, cost, options, "quality", 0.9, "exact").assignment
    assert (column == 2).all()


@pytest.mark.parametrize("solver", ["fast", "exact"])
def test_a_quality_window_probes_when_only_probing_reaches_the_target(solver: str) -> None:
    """No direct plan reaches 0.8 (the best model reads 0.7); the probe option does,
    at more cost. The plan that reaches the target is kept (before: the cheaper
    direct plan, which misses it)."""
    quality = np.array([[0.6, 0.7]] * 10)
    cost = np.array([[1.0, 2.0]] * 10)
    options = OptionMatrices(np.full((10, 1), 0.95), np.full((10, 1), 3.0), np.full(10, 2.0))
    plan = solve_first_stage(quality, cost, options, "quality", 0.8, cast(Method, solver))
    assert plan.status in ("optimal", "near_optimal")
    assert plan.mean_quality >= 0.8 - 1e-9
    assert (plan.assignment == 2).any()


@pytest.mark.parametrize("solver", ["fast", "exact"])
def test_exploring_a_quality_first_stage_keeps_its_target(solver: str) -> None:
    """Half the window explored (direct answers only), in 20 draws; the rest, planned
    again with probe options for what exploration left of the target, still reaches
    it (before: where the rest's direct plan missed the raised target, that cheaper
    plan was kept over the probe plan reaching it, and the window read 0.775)."""
    quality = np.array([[0.6, 0.85]] * 10)
    cost = np.array([[1.0, 2.0]] * 10)
    options = OptionMatrices(np.full((10, 1), 0.95), np.full((10, 1), 2.5), np.full(10, 2.0))
    problem = first_stage_problem(quality, cost, options, "quality", 0.8)
    for seed in range(20):
        explored = explore_and_solve(
            problem,
            np.zeros((10, 3)),
            0.5,
            np.random.default_rng(seed),
            allowed=np.array([[True, True, False]] * 10),
            planner=lambda window: plan_first_stage(window, 2, cast(Method, solver)),
        )
        assert explored.explored.any()
        assert (explored.plan.assignment[explored.explored] < 2).all()
        assert explored.plan.mean_quality >= 0.8 - 1e-9, seed


@pytest.mark.parametrize("mode", ["budget", "quality"])
def test_a_cascade_window_that_probes_nothing_explores_as_a_one_shot_window(mode: str) -> None:
    """Probe options are never explored, so they take no belief draws: the same
    queries are explored with the same models as in a one-shot window (before: the
    draws spanned the option columns too, and other queries were explored)."""
    rng = np.random.default_rng(7)
    n = 40
    quality = rng.uniform(0.3, 0.9, size=(n, 3))
    cost = np.tile(COSTS, (n, 1))
    support = rng.integers(0, 30, size=(n, 3)).astype(float)
    # A probe option dearer than the dear model and worse than the cheap ones.
    options = OptionMatrices(np.full((n, 1), 0.1), np.full((n, 1), 30.0), np.full(n, 2.2))
    limit = 5.0 * n if mode == "budget" else 0.6
    one_shot = WindowProblem(
        quality,
        cost,
        cast(Mode, mode),
        window_budget_usd=limit if mode == "budget" else None,
        quality_target=limit if mode == "quality" else None,
    )
    cascade = first_stage_problem(quality, cost, options, cast(Mode, mode), limit)
    plain = explore_and_solve(one_shot, support, 0.2, np.random.default_rng(3), method="exact")
    probed = explore_and_solve(
        cascade,
        np.hstack([support, np.zeros((n, 1))]),
        0.2,
        np.random.default_rng(3),
        allowed=np.hstack([np.ones((n, 3), dtype=bool), np.zeros((n, 1), dtype=bool)]),
        planner=lambda window: plan_first_stage(window, 3, "exact"),
    )
    assert plain.explored.sum() >= 3
    assert probed.explored.tolist() == plain.explored.tolist()
    assert probed.plan.assignment.tolist() == plain.plan.assignment.tolist()


def test_a_probe_plan_out_of_time_that_misses_the_target_is_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exact solver out of time hands back the fast path's plan, status
    "time_limited", which may miss the target: the first stage must check the plan
    against its window, not trust the status (before: this cheaper plan, reaching
    0.7 of a 0.8 target, was kept over the direct plan that reaches it)."""
    quality = np.array([[0.6, 0.85]] * 10)
    cost = np.array([[1.0, 2.0]] * 10)
    options = OptionMatrices(np.full((10, 1), 0.7), np.full((10, 1), 1.5), np.full(10, 1.0))
    problem = first_stage_problem(quality, cost, options, "quality", 0.8)
    real_solve = cascade_module.solve

    def out_of_time_with_probes(window: WindowProblem, *args: object) -> WindowPlan:
        if window.n_models == 2:
            return real_solve(window, "exact")
        return WindowPlan(window, np.full(10, 2), "time_limited", "lagrangian", 2.0)

    monkeypatch.setattr(cascade_module, "solve", out_of_time_with_probes)
    plan = plan_first_stage(problem, 2, "exact")
    assert (plan.assignment < 2).all()
    assert plan.mean_quality >= 0.8 - 1e-9


def test_a_forced_escalation_takes_the_cheapest_model_with_a_slot_left() -> None:
    """Queries no probe answered go to their cheapest model not asked yet; with
    capacities, in turn, to the cheapest such model with a slot left, else to an
    allowed model asked already with one (asked again), and over a cap only when
    no allowed model has a slot (a query must be answered)."""
    cost = np.tile([1.0, 1.2, 20.0, 5.0], (4, 1))
    allowed = np.ones((4, 4), dtype=bool)
    asked = np.tile([True, True, False, False], (4, 1))
    assert forced_escalation(cost, allowed, asked).tolist() == [3, 3, 3, 3]
    capped = forced_escalation(cost, allowed, asked, (None, None, None, 2))
    assert capped.tolist() == [3, 3, 2, 2]
    # The models not asked yet are full: the panel's (uncapped) are asked again
    # (before: the cheapest fresh model, over its cap).
    full = forced_escalation(cost, allowed, asked, (None, None, 1, 1))
    assert full.tolist() == [3, 2, 0, 0]
    nowhere = forced_escalation(cost, allowed, asked, (0, 0, 1, 1))
    assert nowhere.tolist() == [3, 2, 3, 3]


def test_forced_escalations_serve_the_queries_with_fewest_models_first() -> None:
    """The second query may only have model 1; taking it first leaves model 2 for
    the first (before, in order: both on model 1, one over its cap)."""
    cost = np.tile([1.0, 5.0, 9.0], (2, 1))
    allowed = np.array([[True, True, True], [False, True, False]])
    asked = np.tile([True, False, False], (2, 1))
    assert forced_escalation(cost, allowed, asked, (None, 1, 1)).tolist() == [2, 1]


@pytest.mark.parametrize(("mode", "limit"), [("budget", 1.0), ("quality", 0.5)])
def test_a_forced_escalation_takes_its_slot_before_the_plan(mode: str, limit: float) -> None:
    """Model 1 has one slot; the first query had no probe answer and its hints allow
    only models 0 (asked) and 1; the second is answered and would escalate to 1 too.
    The forced query takes the slot, the other accepts (before, in budget mode: the
    plan took it first and the forced query went over the cap)."""
    posterior = np.array([[0.0, 0.8, -1.0], [0.5, 0.8, 0.9]])
    choice = _escalation_choice(
        posterior,
        np.array([-1.0, 0.5]),
        np.array([[1.0, 10.0, 50.0], [1.0, 1.0, 50.0]]),
        np.array([[True, True, False], [True, True, True]]),
        np.array([[False], [True]]),
        np.array([[True, False, False], [True, False, False]]),
        [0],
        EscalationLimit(cast(Mode, mode), limit),
        "exact",
        0.0,
        (0, 1, None),
    )
    assert choice.tolist() == [1, NEVER]


def test_a_chosen_panel_leaves_out_the_models_that_may_not_probe() -> None:
    """A capped model may not probe (a probe takes a slot of every panel model at
    once): with model 1 left out, the panel is the other cheap model alone."""
    n = 400
    responses, truth, costs = recorded(n, seed=1)
    predicted = np.tile([0.7, 0.7, 0.95], (n, 1))
    ids = [f"q{i}" for i in range(n)]
    vectors = unit_vectors(n, 1)
    chosen = fit_cascade(ids, vectors, responses, predicted, truth, costs, probe_models=[0, 2])
    assert chosen.panel == [0]
    assert fit_cascade(ids, vectors, responses, predicted, truth, costs).panel == [0, 1]
    # Only the escalation target may probe: no panel, said so (the router warns).
    with pytest.raises(NoPanel, match="one model at least to probe with"):
        fit_cascade(ids, vectors, responses, predicted, truth, costs, probe_models=[2])


def test_escalations_spend_only_what_is_left() -> None:
    posterior = np.array(
        [
            [0.95, 0.9, 0.9],  # probes likely right: accept
            [0.3, 0.2, 0.8],  # doubtful: escalate if affordable
            [0.45, 0.35, 0.9],
        ]
    )
    accept = posterior[:, :2].max(axis=1)
    cost = np.tile(COSTS, (3, 1))
    plenty = plan_escalations(posterior, accept, cost, [0, 1], "budget", 100.0, "exact")
    assert plenty.tolist() == [NEVER, 2, 2]
    one = plan_escalations(posterior, accept, cost, [0, 1], "budget", 25.0, "exact")
    assert one.tolist() == [NEVER, 2, NEVER]  # the larger gain (0.5 against 0.45)
    none = plan_escalations(posterior, accept, cost, [0, 1], "budget", 0.0, "exact")
    assert none.tolist() == [NEVER] * 3
    # Quality mode: escalate just enough to reach the mean the window still needs
    # (accepting all: 0.567; escalating the second: 0.733, the third: 0.717).
    target = plan_escalations(posterior, accept, cost, [0, 1], "quality", 0.72, "exact")
    assert target.tolist() == [NEVER, 2, NEVER]


def test_escalation_limit_is_what_the_window_has_left() -> None:
    assert escalation_limit("budget", 10.0, 7.5, 0.0, 5, 2) == 2.5
    assert escalation_limit("budget", 10.0, 12.0, 0.0, 5, 2) == 0.0
    # 5 queries at a target of 0.8 need 4.0; direct answers bring 2.7; 2 probed must
    # bring 1.3, 0.65 each.
    assert escalation_limit("quality", 0.8, 0.0, 2.7, 5, 2) == pytest.approx(0.65)


@pytest.mark.parametrize("per_query", [0.5, 3.0, 6.0, 25.0])
def test_a_window_s_spend_covers_every_stage_and_keeps_the_budget(
    policy: CascadePolicy, per_query: float
) -> None:
    n = 120
    responses, _, costs = recorded(n, seed=7)
    quality = np.tile([0.7, 0.7, 0.95], (n, 1))
    budget = per_query * n
    window = run_window(
        policy, quality, costs, unit_vectors(n, 7), responses, costs, "budget", budget, "exact"
    )
    rows = np.arange(n)
    direct = ~window.probed
    assert window.direct_usd == pytest.approx(costs[rows[direct], window.final_model[direct]].sum())
    assert window.probe_usd == pytest.approx(costs[np.ix_(rows[window.probed], policy.panel)].sum())
    escalated = window.escalated
    assert escalated.sum() <= window.probed.sum()
    assert window.escalation_usd == pytest.approx(costs[escalated, 2].sum())
    assert (window.final_model[escalated] == 2).all()
    assert window.total_usd == pytest.approx(
        window.direct_usd + window.probe_usd + window.escalation_usd
    )
    cheapest_plan = costs.min(axis=1).sum()
    assert window.total_usd <= max(budget, cheapest_plan) + 1e-9
    # Accepted probe answers are the panel's.
    accepted = window.probed & ~escalated
    assert np.isin(window.final_model[accepted], policy.panel).all()


def test_probing_beats_direct_routing_at_a_middling_budget(policy: CascadePolicy) -> None:
    n = 200
    responses, truth, costs = recorded(n, seed=11)
    quality = np.tile([0.7, 0.7, 0.95], (n, 1))
    budget = 10.0 * n
    window = run_window(
        policy, quality, costs, unit_vectors(n, 11), responses, costs, "budget", budget, "exact"
    )
    cascade = truth[np.arange(n), window.final_model].mean()
    # Without probes the budget buys the dear model for (10 - 1) / 19 of the queries.
    direct_share = (10.0 - 1.0) / 19.0
    direct = direct_share * truth[:, 2].mean() + (1 - direct_share) * truth[:, 0].mean()
    assert window.probed.any() and window.escalated.any()
    assert cascade > direct + 0.05


def test_options_and_posteriors_computed_once_give_the_same_window(
    policy: CascadePolicy,
) -> None:
    n = 90
    responses, _, costs = recorded(n, seed=5)
    quality = np.tile([0.7, 0.7, 0.95], (n, 1))
    vectors = unit_vectors(n, 5)
    args = (policy, quality, costs, vectors, responses, costs, "budget", 8.0 * n, "exact")
    alone = run_window(*args)
    answers = ProbeAnswers.of([[r[j] for j in policy.panel] for r in responses])
    shared = run_window(
        *args,
        options=price_options(policy, policy.clusters(vectors), quality, costs),
        posterior=policy.scorer.posterior(answers, quality, policy.clusters(vectors)),
    )
    assert alone.probed.any() and alone.escalated.any()
    assert shared.final_model.tolist() == alone.final_model.tolist()
    assert shared.total_usd == alone.total_usd


def test_a_two_model_pool_probes_with_its_cheaper_model() -> None:
    """Two models: no pair of cheap models leaves the most accurate one to escalate
    to, so the panel is the other model alone (a classic two-model cascade), never
    an empty panel (the scorer failed on it: "Input X contains NaN")."""
    n = 300
    responses, truth, costs = recorded(n, seed=3)
    responses = [row[1:] for row in responses]
    truth, costs = truth[:, 1:], costs[:, 1:]
    predicted = np.tile([0.7, 0.95], (n, 1))
    ids = [f"q{i}" for i in range(n)]
    two = fit_cascade(ids, unit_vectors(n, 3), responses, predicted, truth, costs)
    assert two.panel == [0]


def test_a_cascade_needs_a_panel() -> None:
    """One model: nothing to probe with and nothing to escalate to; a clear error,
    not the scorer's."""
    n = 50
    responses, truth, costs = recorded(n, seed=4)
    with pytest.raises(ValueError, match="panel"):
        fit_cascade(
            [f"q{i}" for i in range(n)], unit_vectors(n, 4), [row[:1] for row in responses],
            np.full((n, 1), 0.7), truth[:, :1], costs[:, :1],
        )  # fmt: skip
