"""Shadow answers: a second model's answer to learn from, within the window's budget,
where a label is worth most per dollar (the improvement over the answer it may
reveal), only of models that might be better than the answer, none when the
share is 0."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from schemas import PredictedQuery, QueryEvent
from workers.config import PoolPolicy
from workers.routing.exploration import explore_and_solve
from workers.routing.optimizer import WindowProblem
from workers.routing.shadow import NOT_SHADOWED, choose_shadows
from workers.routing.windows import WindowBounds, route_window

MODELS = ["frontier", "mid", "small", "tiny"]
COSTS = [0.012, 0.001, 0.0001, 0.0001]
START = datetime(2026, 1, 1, tzinfo=UTC)
BOUNDS = WindowBounds("w", START, START + timedelta(seconds=5))


def predicted(i: int, quality: list[float], support: list[float]) -> PredictedQuery:
    return PredictedQuery(
        query=QueryEvent(query_id=f"q{i}", text=f"query {i}"),
        models=MODELS,
        quality=quality,
        cost_usd=COSTS,
        support=support,
    )


def window(n: int, quality: list[float], support: list[float]) -> WindowProblem:
    del support
    return WindowProblem(
        np.tile(quality, (n, 1)), np.tile(COSTS, (n, 1)), "budget", window_budget_usd=1.0
    )


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_shadows_are_extra_assignments_within_the_budget_and_their_share(method: str) -> None:
    budget = 0.05  # the plan spends most of it (frontier is predicted best)
    policy = PoolPolicy(mode="budget", window_budget_usd=budget)
    cold = [predicted(i, [0.9, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]) for i in range(100)]
    assignments, report = route_window(
        "default", policy, cold, MODELS, BOUNDS, solver=method,  # type: ignore[arg-type]
        tie_tolerance=0.005, exploration_share=0.05, shadow_share=0.1,
    )  # fmt: skip
    answers = [a for a in assignments if a.role == "answer"]
    shadows = [a for a in assignments if a.role == "shadow"]
    assert len(answers) == 100 and len({a.query_id for a in answers}) == 100
    assert shadows and report.shadow_queries == len(shadows)
    spend = sum(a.predicted_cost_usd for a in shadows)
    assert report.shadow_spend_usd == pytest.approx(spend)
    answers_spend = sum(a.predicted_cost_usd for a in answers)
    assert spend <= max(0.1 * budget, budget - answers_spend) + 1e-12
    assert report.predicted_spend_usd == pytest.approx(
        sum(a.predicted_cost_usd for a in assignments)
    )
    assert report.predicted_spend_usd <= budget + 1e-9
    answered = {a.query_id: a.model for a in answers}
    assert all(a.model != answered[a.query_id] for a in shadows)
    assert len({a.query_id for a in shadows}) == len(shadows)  # one shadow a query at most
    assert not any(a.exploration for a in shadows)
    assert sum(report.assignments_per_model.values()) == 100  # answers only


def test_no_shadows_when_the_share_is_zero() -> None:
    policy = PoolPolicy(mode="budget", window_budget_usd=1.0)
    cold = [predicted(i, [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]) for i in range(50)]
    assignments, report = route_window(
        "default", policy, cold, MODELS, BOUNDS, exploration_share=0.05
    )
    assert all(a.role == "answer" for a in assignments) and len(assignments) == 50
    assert report.shadow_queries == 0 and report.shadow_spend_usd == 0.0
    problem = window(50, [0.5] * 4, [0.0] * 4)
    none = choose_shadows(problem, np.full(50, 1), np.zeros((50, 4)), 0.0)
    assert (none == NOT_SHADOWED).all()


def test_the_allowance_is_respected() -> None:
    n = 100
    problem = window(n, [0.5] * 4, [0.0] * 4)
    chosen = choose_shadows(problem, np.full(n, 1), np.zeros((n, 4)), allowance_usd=0.00105)
    rows = np.flatnonzero(chosen != NOT_SHADOWED)
    assert len(rows) == 10  # ten labels of a $0.0001 model fit; an eleventh does not
    assert problem.cost[rows, chosen[rows]].sum() <= 0.00105


def test_the_least_known_cheap_model_is_shadowed() -> None:
    """Of two equally cheap models the one the router knows least; the dear unknown
    one not before the cheap ones are known (a label of it costs 120 of theirs)."""
    n = 20
    problem = window(n, [0.6, 0.6, 0.6, 0.6], [0.0] * 4)
    support = np.tile([0.0, 50.0, 40.0, 2.0], (n, 1))
    chosen = choose_shadows(problem, np.full(n, 1), support, allowance_usd=0.00155)
    picked = chosen[chosen != NOT_SHADOWED]
    assert len(picked) == 15 and set(picked.tolist()) == {3}


def test_a_label_that_may_show_a_better_model_outweighs_cheap_labels_of_a_worse_one() -> None:
    """The answer (mid, 0.7, well known); tiny believed 0.35 on 20 outcomes, cheap but
    all but sure to be worse; frontier unknown, dear, as likely better as worse. Worth
    read as spread per dollar shadowed every query with tiny and frontier never: one
    shadow a query, and tiny's labels are 120 times cheaper. A frontier label may
    change the routing; a tiny one all but cannot."""
    n = 20
    problem = window(n, [0.7, 0.7, 0.5, 0.35], [0.0] * 4)
    support = np.tile([0.0, 200.0, 200.0, 20.0], (n, 1))
    chosen = choose_shadows(problem, np.full(n, 1), support, allowance_usd=2 * COSTS[0])
    picked = chosen[chosen != NOT_SHADOWED]
    assert picked.tolist() == [0, 0]


def test_a_shadow_is_never_the_answers_model_nor_beyond_a_capacity() -> None:
    n = 30
    problem = WindowProblem(
        np.tile([0.9, 0.6, 0.5, 0.5], (n, 1)),
        np.tile(COSTS, (n, 1)),
        "budget",
        window_budget_usd=0.05,
        capacities=(None, None, None, 5),
    )
    planned = explore_and_solve(
        problem, np.zeros((n, 4)), 0.0, np.random.default_rng(0), "fast", shadow_share=0.5
    )
    assert planned.shadows is not None
    shadowed = np.flatnonzero(planned.shadows != NOT_SHADOWED)
    assert shadowed.size > 0
    assert (planned.shadows[shadowed] != planned.plan.assignment[shadowed]).all()
    answers_and_shadows_on_tiny = (planned.plan.assignment == 3).sum() + (
        planned.shadows == 3
    ).sum()
    assert answers_and_shadows_on_tiny <= 5
    total = planned.plan.total_cost_usd + planned.shadow_spend_usd
    assert total <= 0.05 + 1e-12
    assert planned.shadow_spend_usd <= 0.5 * 0.05 + 1e-12


def test_what_the_plan_leaves_unspent_buys_labels_of_models_that_might_be_better() -> None:
    """With few outcomes the plan keeps to a cheap model and leaves most of the budget
    unspent: that money buys shadow answers of the unknown models, not of a model
    known to be worse, and never more than the budget."""
    n = 40
    quality = np.tile([0.5, 0.2, 0.7, 0.5], (n, 1))
    support = np.tile([0.0, 500.0, 500.0, 0.0], (n, 1))  # mid known to be worse
    problem = WindowProblem(quality, np.tile(COSTS, (n, 1)), "budget", window_budget_usd=0.2)
    planned = explore_and_solve(
        problem, support, 0.0, np.random.default_rng(0), "fast", shadow_share=0.01
    )
    assert planned.shadows is not None
    picked = planned.shadows[planned.shadows != NOT_SHADOWED]
    assert (planned.plan.assignment == 2).all()  # small answers every query
    assert planned.shadow_spend_usd > 0.01 * 0.2  # more than the share: the unspent budget
    assert planned.plan.total_cost_usd + planned.shadow_spend_usd <= 0.2 + 1e-12
    assert 1 not in picked  # mid: known worse, a label cannot change the routing
    assert 0 in picked  # frontier: unknown, dear, might be better


def test_a_confident_router_spends_no_more_than_its_share() -> None:
    """Every other model known to be worse: no draw beats the answer, nothing is
    shadowed however much of the budget is left."""
    n = 40
    quality = np.tile([0.3, 0.2, 0.8, 0.1], (n, 1))
    support = np.full((n, 4), 1000.0)
    problem = WindowProblem(quality, np.tile(COSTS, (n, 1)), "budget", window_budget_usd=1.0)
    planned = explore_and_solve(
        problem, support, 0.0, np.random.default_rng(0), "fast", shadow_share=0.05
    )
    assert planned.shadow_spend_usd == 0.0


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_a_quality_window_that_cannot_reach_its_target_still_gets_shadows(method: str) -> None:
    """A shadow leaves every answer as planned, so an unreachable target (every model
    predicted below it, as with little history) is no reason to refuse one: the
    room check refused them all, and such a window learned nothing."""
    policy = PoolPolicy(mode="quality", quality_target=0.95)
    cold = [predicted(i, [0.7, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]) for i in range(50)]
    assignments, report = route_window(
        "default", policy, cold, MODELS, BOUNDS, solver=method,  # type: ignore[arg-type]
        tie_tolerance=0.005, shadow_share=0.2,
    )  # fmt: skip
    assert report.solver_status.endswith("target_best_quality_plan")  # not reachable
    assert report.shadow_queries > 0
    answers = [a for a in assignments if a.role == "answer"]
    assert {a.model for a in answers} == {"frontier"}  # the best plan, as without shadows


@pytest.mark.parametrize("mode", ["quality", "budget"])
def test_under_capacities_shadows_take_only_slots_the_answers_leave_free(mode: str) -> None:
    """A shadow in a slot an answer used pushed that answer to a dearer (or worse)
    model when the rest was planned again: with shadows on, a quality window's
    answers cost twice as much for a few cents of shadows (found by review)."""
    rng = np.random.default_rng(1)
    n, m = 400, 6
    quality = np.clip(rng.normal(np.linspace(0.4, 0.8, m), 0.2, (n, m)), 0, 1)
    cost = np.geomspace(1e-5, 3e-3, m) * rng.uniform(0.5, 2, (n, m))
    support = rng.uniform(0, 5, (n, m))
    limits = {"quality_target": 0.68} if mode == "quality" else {"window_budget_usd": 0.12}
    problem = WindowProblem(
        quality, cost, mode, capacities=(90, 90, 80, 80, 70, 70), fallback_model=0, **limits
    )  # type: ignore[arg-type]
    plans = [
        explore_and_solve(
            problem, support, 0.0, np.random.default_rng(0), "fast", 0.25, None, 0.0, share
        )
        for share in (0.0, 0.05)
    ]
    if mode == "quality":  # the answers as without shadows (budget: shadows spend some of it)
        assert plans[0].plan.assignment.tolist() == plans[1].plan.assignment.tolist()
    shadows = plans[1].shadows[plans[1].shadows != NOT_SHADOWED]
    used = np.bincount(plans[1].plan.assignment, minlength=m) + np.bincount(shadows, minlength=m)
    assert (used <= np.array(problem.capacity_array)).all()


def test_without_an_allowed_mask_exploration_and_shadows_keep_the_problem_s_hints() -> None:
    """`allowed` left at its default meant every pair: the problem's own hints were
    ignored, and a query allowed only "mid" was explored on the others."""
    hints = np.zeros((20, 4), dtype=bool)
    hints[:, 1] = True
    problem = WindowProblem(
        np.full((20, 4), 0.5), np.tile(COSTS, (20, 1)), "budget", window_budget_usd=1.0,
        allowed=hints,
    )  # fmt: skip
    support = np.zeros((20, 4))
    explored = explore_and_solve(problem, support, 1.0, np.random.default_rng(0), shadow_share=1.0)
    assert (explored.plan.assignment == 1).all()
    assert (explored.shadows == NOT_SHADOWED).all()
    answered = np.ones(20, dtype=np.int64)
    assert (choose_shadows(problem, answered, support, 1.0) == NOT_SHADOWED).all()
