"""A first stage whose panel has a capped model: a probe takes a slot of every panel
model, so a panel model's direct answers and all probes stay within its cap."""

from __future__ import annotations

from functools import partial
from typing import cast

import numpy as np
import pytest
from numpy.typing import NDArray

from workers.routing.cascade import (
    OptionMatrices,
    direct_only,
    first_stage_problem,
    plan_first_stage,
)
from workers.routing.exploration import explore_and_solve
from workers.routing.optimizer import Method, Mode, WindowProblem, solve
from workers.routing.panel_capacity import keeps_panel_caps, room_window

# Two cheap panel models (0, 1), a dear one (2); one probe option, better for its
# price than anything answered directly.
N = 20
QUALITY = np.tile([0.6, 0.6, 0.9], (N, 1))
COST = np.tile([1.0, 1.0, 10.0], (N, 1))
OPTIONS = OptionMatrices(np.full((N, 1), 0.85), np.full((N, 1), 3.0), np.full(N, 2.0))
PANEL = [0, 1]


def window(mode: str, capacities: tuple[int | None, ...] | None) -> WindowProblem:
    limit = 4.0 * N if mode == "budget" else 0.8
    return first_stage_problem(
        QUALITY, COST, OPTIONS, cast(Mode, mode), limit, capacities=capacities, fallback_model=2
    )


@pytest.mark.parametrize("solver", ["fast", "exact"])
@pytest.mark.parametrize("mode", ["budget", "quality"])
def test_a_capped_panel_model_holds_its_direct_answers_and_every_probe(
    solver: str, mode: str
) -> None:
    unbounded = plan_first_stage(window(mode, None), 3, cast(Method, solver), panel=PANEL)
    assert (unbounded.assignment >= 3).sum() > 6  # the cap below binds
    problem = window(mode, (6, None, None))
    plan = plan_first_stage(problem, 3, cast(Method, solver), panel=PANEL)
    probes = int((plan.assignment >= 3).sum())
    direct_on_0 = int((plan.assignment == 0).sum())
    assert probes > 0 and direct_on_0 + probes <= 6
    assert keeps_panel_caps(problem, plan.assignment, 3, PANEL)
    assert problem.meets_limit(plan.assignment)


def test_without_room_in_the_panel_nothing_is_probed() -> None:
    problem = window("budget", (0, None, None))
    plan = plan_first_stage(problem, 3, "exact", panel=PANEL)
    assert (plan.assignment < 3).all() and (plan.assignment != 0).all()


@pytest.mark.parametrize("solver", ["fast", "exact"])
def test_a_window_larger_than_every_cap_still_probes_within_the_panel_s_caps(
    solver: str,
) -> None:
    """Every model capped (6 + 6 + 2 slots for 20 queries), the dear model the
    fallback taking what the caps cannot hold: the panel's slots still go to
    probes. The plans with probes were checked against the probe window's
    capacities, where the fallback is never lifted (its probe options are uncapped
    columns), so every one was refused and nothing was probed."""
    problem = first_stage_problem(
        QUALITY, COST, OPTIONS, "budget", 160.0, capacities=(6, 6, 2), fallback_model=2
    )
    plan = plan_first_stage(problem, 3, cast(Method, solver), panel=PANEL)
    # Six probes fill the panel's slots, the dear model the rest: $158, 17.7 right,
    # against at best $155, 16.5 right answered directly.
    assert (plan.assignment >= 3).sum() == 6
    assert keeps_panel_caps(problem, plan.assignment, 3, PANEL)
    assert problem.meets_limit(plan.assignment)
    direct = plan_first_stage(direct_only(problem, 3), 3, cast(Method, solver))
    assert plan.total_quality > direct.total_quality


def random_window(seed: int, mode: str) -> tuple[WindowProblem, NDArray[np.bool_], int]:
    """A small first-stage window with random caps on the panel (and the dear model),
    a random fallback and random hints; its direct columns' allowed mask."""
    rng = np.random.default_rng(seed)
    n, m, k = int(rng.integers(3, 14)), int(rng.integers(3, 5)), int(rng.integers(1, 3))
    quality = rng.uniform(0.2, 0.95, (n, m))
    cost = rng.uniform(0.5, 10, (n, m)) * np.array([1, 1.2] + [5] * (m - 2))
    probe_cost = cost[:, PANEL].sum(axis=1)
    options = OptionMatrices(
        rng.uniform(0.5, 1.0, (n, k)), probe_cost[:, None] + rng.uniform(0, 5, (n, k)), probe_cost
    )
    caps: list[int | None] = [None] * m
    for j in (0, 1, 2):
        if rng.random() < (0.8 if j < 2 else 0.3):
            caps[j] = int(rng.integers(0, n))
    fallback = [None, 0, 1, 2][int(rng.integers(0, 4))]
    allowed = np.ones((n, m + k), dtype=bool)
    if rng.random() < 0.6:
        allowed[:, :m] = rng.random((n, m)) < 0.7
        allowed[~allowed[:, :m].any(axis=1), int(rng.integers(0, m))] = True
        allowed[:, m:] = allowed[:, PANEL].all(axis=1)[:, None]
    limit = (
        float(cost.min(axis=1).sum() * rng.uniform(0.8, 3))
        if mode == "budget"
        else float(rng.uniform(0.5, 0.95))
    )
    room = sum(n if c is None else c for c in caps)
    fallback = 2 if fallback is None and room < n else fallback
    problem = first_stage_problem(
        quality, cost, options, cast(Mode, mode), limit, 0.0, allowed, tuple(caps), fallback
    )
    return problem, allowed[:, :m], m


@pytest.mark.parametrize("solver", ["fast", "exact"])
@pytest.mark.parametrize("mode", ["budget", "quality"])
def test_random_windows_keep_the_panel_caps_and_what_the_direct_plan_keeps(
    solver: str, mode: str
) -> None:
    """60 random windows (a reviewer's fuzz found plans over a panel cap where a
    capped panel model was the fallback or hints lifted its cap, and over a budget
    the direct plan kept): a plan that probes keeps every panel cap as configured,
    and its window's limit wherever the direct-only plan keeps it."""
    for seed in range(60):
        problem, _, m = random_window(seed, mode)
        plan = plan_first_stage(problem, m, cast(Method, solver), panel=PANEL)
        direct = solve(direct_only(problem, m), cast(Method, solver))
        if (plan.assignment >= m).any():
            assert keeps_panel_caps(problem, plan.assignment, m, PANEL), seed
            if direct_only(problem, m).meets_limit(direct.assignment):
                assert problem.meets_limit(plan.assignment), seed


@pytest.mark.parametrize("solver", ["fast", "exact"])
@pytest.mark.parametrize("mode", ["budget", "quality"])
def test_exploring_random_windows_keeps_the_panel_caps_and_the_limit(
    solver: str, mode: str
) -> None:
    """Half of each of 130 random windows explored: the rest is planned again so that
    the window still keeps the panel's caps and its limit wherever its plan did
    (before: the room counted on probes beyond the caps, and quality windows
    missed their target, seeds 11 and 26 among them)."""
    explored_windows = 0
    for seed in range(130):
        problem, direct_allowed, m = random_window(seed, mode)
        planner = partial(plan_first_stage, n_models=m, solver=solver, panel=PANEL)
        base = planner(problem)
        explored = explore_and_solve(
            problem,
            np.zeros(problem.quality.shape),
            0.5,
            np.random.default_rng(seed),
            allowed=np.hstack(
                [direct_allowed, np.zeros((problem.n_queries, problem.n_models - m), dtype=bool)]
            ),
            planner=planner,
            room_of=partial(room_window, problem, m, PANEL),
        )
        explored_windows += bool(explored.explored.any())
        plan = explored.plan.assignment
        if problem.meets_limit(base.assignment):
            assert problem.meets_limit(plan), seed
        if (plan >= m).any():
            assert keeps_panel_caps(problem, plan, m, PANEL), seed
    assert explored_windows > 30


@pytest.mark.parametrize("solver", ["fast", "exact"])
@pytest.mark.parametrize(("mode", "limit"), [("budget", 40.0), ("quality", 0.6)])
def test_limiting_probes_pushes_no_query_over_another_model_s_cap(
    solver: str, mode: str, limit: float
) -> None:
    """Panel (1, 2), caps (1, 3, 6); three queries may take only models 0 and 1 and
    are never probed. Probes take panel slots, so those queries cannot all have
    model 1: a limited plan that sent them to model 0 over its cap of 1 was kept
    (a reviewer's case); every model now stays within its cap."""
    n = 6
    quality = np.tile([0.5, 0.55, 0.6], (n, 1))
    cost = np.ones((n, 3))
    probe_cost = cost[:, [1, 2]].sum(axis=1)
    options = OptionMatrices(np.full((n, 1), 0.95), probe_cost[:, None] + 0.1, probe_cost)
    allowed = np.ones((n, 4), dtype=bool)
    allowed[:3, 2:] = False
    problem = first_stage_problem(
        quality, cost, options, cast(Mode, mode), limit, 0.0, allowed, (1, 3, 6)
    )
    plan = plan_first_stage(problem, 3, cast(Method, solver), panel=[1, 2]).assignment
    load = np.bincount(plan, minlength=4)
    assert load[0] <= 1
    assert keeps_panel_caps(problem, plan, 3, [1, 2])
