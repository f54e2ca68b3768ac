"""Exploration: a small share of each window goes where the router knows least.

A router that only ever sends a query to the model it predicts best never
learns that it misjudged another one. So after a window is planned, a share
of its queries is sent to other models, chosen by Thompson sampling: each
(query, model) pair draws a quality from a Beta belief centred on the
prediction, as wide as the prediction's support is thin (the stored outcomes'
worth behind it). The queries to explore are drawn at random from the window,
and each goes to the model whose draw beats the planned model's prediction by
most (the next such model if that one does not fit what is left): a model
both unknown and possibly better there. Random queries, not those where the
draws win by most, because those are the queries whose planned model is
predicted weakest, the hard ones: a model explored only on hard queries is
judged worse than it is and is never planned (in the cold-start loop every
explored model ended believed 0.1-0.4 below its real accuracy).

Exploration never breaks the window's promise. In budget mode it spends its
allowance, `share` of each window's budget, and never so much that the rest
of the window could no longer be planned within what is left; an allowance a
window does not use (one query on a dear model may cost more than a small
window's share) carries over to the next, up to the cost of the window's
dearest pair it may explore, so over time exploration spends `share` of the budget and no
more, and the dearest model can be tried too. In quality mode it gives up at
most the quality the window can spare above its target. The rest of the
window is then solved again by the same optimiser with what is left, so the
window as a whole keeps its budget (or reaches its target); a cascade pool's
first stage plans it with its probe options too (its `planner`).

Shadow answers (workers/routing/shadow.py) have their own share of the
window's budget (or what the plan leaves unspent), within the room exploration
left; their cost is reserved before the rest is planned again, so they too are
within the window's budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from workers.routing.optimizer import Method, WindowPlan, WindowProblem, solve
from workers.routing.room import NONE, WindowRoom
from workers.routing.shadow import NOT_SHADOWED, choose_shadows, shadow_spend

NOT_EXPLORED = NONE

# How a window, or what exploration leaves of it, is planned: by default the
# optimiser's `solve`; a cascade pool's first stage weighs probe options too.
Planner = Callable[[WindowProblem], WindowPlan]


@dataclass(frozen=True)
class ExploredPlan:
    """The window's plan with its exploratory assignments."""

    plan: WindowPlan  # covers every query of the window, explored ones included
    explored: NDArray[np.bool_]  # (n_queries,), True where the model was chosen to learn
    exploration_spend_usd: float
    # Budget mode: what exploration may spend in the next window of the pool.
    next_allowance_usd: float = 0.0
    # (n_queries,), the model giving each query a shadow answer or NOT_SHADOWED;
    # None: no shadows.
    shadows: NDArray[np.int64] | None = None
    shadow_spend_usd: float = 0.0


def window_allowance(
    problem: WindowProblem,
    share: float,
    carried_usd: float,
    allowed: NDArray[np.bool_] | None = None,
) -> float:
    """What exploration may spend in this window: its share of the budget plus what
    earlier windows left unused, at most the cost of the window's dearest pair it
    may explore (`allowed`; or the share, if that is more)."""
    if problem.mode != "budget" or problem.window_budget_usd is None:
        return math.inf
    own = share * problem.window_budget_usd
    explorable = problem.permitted_within(allowed)
    dearest = float(np.where(explorable, problem.cost, 0.0).max())
    return min(own + carried_usd, max(own, dearest))


def belief_samples(
    quality: NDArray[np.float64], support: NDArray[np.float64], rng: np.random.Generator
) -> NDArray[np.float64]:
    """One draw per pair from Beta(q (n + 2), (1 - q)(n + 2)): the prediction q as
    its mean, n stored outcomes' worth as its width (n = 0: uniform)."""
    strength = np.maximum(support, 0.0) + 2.0
    q = np.clip(quality, 1e-6, 1 - 1e-6)
    return rng.beta(q * strength, (1 - q) * strength)


def _draws_of_explorable_columns(
    problem: WindowProblem,
    support: NDArray[np.float64],
    rng: np.random.Generator,
    explorable: NDArray[np.bool_],
) -> NDArray[np.float64]:
    """Belief draws of the columns some query may explore (-inf elsewhere). Columns
    never explored take no draws, so a cascade window (whose probe options are
    never explored) draws what a one-shot window of the same models would."""
    draws = np.full(problem.quality.shape, -np.inf)
    draws[:, explorable] = belief_samples(
        problem.quality[:, explorable], support[:, explorable], rng
    )
    return draws


def choose_explorations(
    problem: WindowProblem,
    planned: NDArray[np.int64],
    support: NDArray[np.float64],
    share: float,
    rng: np.random.Generator,
    allowed: NDArray[np.bool_] | None = None,
    allowance_usd: float = math.inf,
    room_window: WindowProblem | None = None,
) -> NDArray[np.int64]:
    """For each query the model to explore, or NOT_EXPLORED: at most
    `exploration_count` of them, within the allowance and the window's room
    (module doc; `room_window`: the window the rest must still fit, default
    `problem`)."""
    n, m = problem.quality.shape
    chosen = np.full(n, NOT_EXPLORED, dtype=np.int64)
    most = exploration_count(share, n, rng)
    if most == 0 or m == 1:
        return chosen
    rows = np.arange(n)
    candidates = problem.permitted_within(allowed)
    explorable: NDArray[np.bool_] = np.asarray(candidates.any(axis=0), dtype=bool)
    draws = _draws_of_explorable_columns(problem, support, rng, explorable)
    candidates[rows, planned] = False
    gain = np.where(candidates, draws - problem.quality[rows, planned][:, None], -np.inf)
    room = WindowRoom(room_window or problem)
    spent = 0.0
    count = 0
    for i in rng.permutation(n):
        if count >= most:
            break
        for j in np.argsort(-gain[i], kind="stable"):
            cost = float(problem.cost[i, j])
            if gain[i, j] <= 0:
                break
            if spent + cost > allowance_usd or not room.take(int(i), int(j), shadow=False):
                continue
            chosen[i] = j
            spent, count = spent + cost, count + 1
            break
    return chosen


def exploration_count(share: float, queries: int, rng: np.random.Generator) -> int:
    """How many of a window's queries may be explored: share x queries, rounded up
    or down at random by its fraction, so the share of the queries on average and
    never a whole query more. Rounded half up, every window of 10 to 29 queries
    explored one at the default 0.05 (a 10-query window twice its share). The
    draw comes from a child of `rng`, leaving the exploration draws as they were."""
    whole, fraction = divmod(share * queries, 1.0)
    return int(whole) + int(rng.spawn(1)[0].random() < fraction)


def explore_and_solve(
    problem: WindowProblem,
    support: NDArray[np.float64],
    share: float,
    rng: np.random.Generator,
    method: Method = "fast",
    time_limit_seconds: float = 0.25,
    allowed: NDArray[np.bool_] | None = None,
    carried_usd: float = 0.0,
    shadow_share: float = 0.0,
    planner: Planner | None = None,
    room_of: Callable[[WindowPlan], WindowProblem] | None = None,
) -> ExploredPlan:
    """Plan the window, explore a share of it, spend a `shadow_share` of its budget
    (or what the plan leaves unspent) on shadow answers, and plan the rest again
    with what is left of the budget (or of the target). `carried_usd`: the
    allowance earlier windows of the pool left (the previous ExploredPlan's
    next_allowance_usd). `planner` plans the window and its rest (default: `solve`
    with `method`); only `allowed` pairs are explored; `room_of`: given the plan,
    the window whose room exploration must leave (default `problem`; a cascade
    window whose panel is capped passes one the room can plan exactly,
    panel_capacity.room_window)."""
    plan_window = planner or (lambda window: solve(window, method, time_limit_seconds))
    plan = plan_window(problem)
    allowance = window_allowance(problem, share, carried_usd, allowed)
    room_window = room_of(plan) if room_of is not None else None
    explore = choose_explorations(
        problem, plan.assignment, support, share, rng, allowed, allowance, room_window
    )
    explored = explore != NOT_EXPLORED
    spend = float(problem.cost[explored, explore[explored]].sum())
    answered = np.where(explored, explore, plan.assignment)
    shadow_allowance = _shadow_allowance(problem, plan, answered, shadow_share)
    draws = belief_samples(problem.quality, support, rng) if shadow_allowance > 0 else None
    shadows = choose_shadows(
        problem, answered, support, shadow_allowance, allowed, draws, fixed=explore
    )
    if not explored.any() and (shadows == NOT_SHADOWED).all():
        left = allowance if math.isfinite(allowance) else 0.0
        return ExploredPlan(plan, explored, 0.0, left, shadows)
    rest = np.flatnonzero(~explored)
    assignment = answered.copy()
    status, solver, seconds = plan.status, plan.solver, plan.solve_seconds
    if rest.size:
        rest_plan = plan_window(_rest_of(problem, explore, rest, shadows))
        assignment[rest] = rest_plan.assignment
        status, solver = rest_plan.status, rest_plan.solver
        seconds += rest_plan.solve_seconds
    if problem.mode == "quality" and not problem.meets_limit(assignment):
        # The rest's target was held at 1 where exploration left more to make up.
        status = "infeasible_target_best_quality_plan"
    # The rest planned again may answer a query with its shadow's model: one answer is enough.
    shadows[shadows == assignment] = NOT_SHADOWED
    shadowed = shadow_spend(problem, shadows)
    left = allowance - spend if math.isfinite(allowance) else 0.0
    return ExploredPlan(
        WindowPlan(problem, assignment, status, solver, seconds),
        explored,
        spend,
        left,
        shadows,
        shadowed,
    )


def _shadow_allowance(
    problem: WindowProblem,
    plan: WindowPlan,
    answered: NDArray[np.int64],
    share: float,
) -> float:
    """What shadows may spend (module doc of shadow.py): in budget mode `share` of
    the window's budget, or what the plan leaves unspent if that is more; in
    quality mode `share` of the planned spend. Each shadow must also leave room to
    plan the rest of the window (choose_shadows)."""
    if share <= 0:
        return 0.0
    if problem.mode != "budget":
        return share * plan.total_cost_usd
    assert problem.window_budget_usd is not None
    budget = problem.window_budget_usd
    unspent = budget - float(problem.cost[np.arange(problem.n_queries), answered].sum())
    return max(share * budget, unspent, 0.0)


def _rest_of(
    problem: WindowProblem,
    explore: NDArray[np.int64],
    rest: NDArray[np.int64],
    shadows: NDArray[np.int64],
) -> WindowProblem:
    """The window's unexplored queries, with what exploration and the shadows left
    of the budget, the target and the capacities."""
    explored = np.flatnonzero(explore != NOT_EXPLORED)
    picks = explore[explored]
    shadowed = shadows[shadows != NOT_SHADOWED]
    budget = target = None
    if problem.mode == "budget":
        assert problem.window_budget_usd is not None
        spent = float(problem.cost[explored, picks].sum()) + shadow_spend(problem, shadows)
        budget = max(problem.window_budget_usd - spent, 0.0)
    else:
        assert problem.quality_target is not None
        needed = problem.quality_target * problem.n_queries
        target = (needed - float(problem.quality[explored, picks].sum())) / rest.size
    capacities = None
    if problem.capacities is not None:
        taken = np.bincount(np.concatenate([picks, shadowed]), minlength=problem.n_models)
        capacities = tuple(
            None if cap is None else max(int(cap - taken[j]), 0)
            for j, cap in enumerate(problem.capacities)
        )
    return WindowProblem(
        problem.quality[rest],
        problem.cost[rest],
        problem.mode,
        window_budget_usd=budget,
        quality_target=None if target is None else float(np.clip(target, 0.0, 1.0)),
        capacities=capacities,
        fallback_model=problem.fallback_model,
        tie_tolerance=problem.tie_tolerance,
        uncertainty=None if problem.uncertainty is None else problem.uncertainty.take(rest),
        allowed=problem.permitted[rest],
    )
