"""`omnirouter bench solver-fuzz`: the fast path against the optimum on small windows."""

from __future__ import annotations

import numpy as np
import pytest

from workers.bench.solver_fuzz import breaks_a_promise, run, shortfall
from workers.routing.optimizer import WindowPlan, WindowProblem, solve_exact


def plan(problem: WindowProblem, assignment: list[int]) -> WindowPlan:
    return WindowPlan(problem, np.array(assignment), "near_optimal", "lagrangian", 0.0)


def test_a_plan_over_a_capacity_or_a_hint_or_the_budget_breaks_a_promise() -> None:
    problem = WindowProblem(
        np.array([[0.5, 0.9], [0.5, 0.9]]), np.array([[0.0, 1.0], [0.0, 1.0]]),
        mode="budget", window_budget_usd=1.0, capacities=(None, 1),
        allowed=np.array([[True, True], [True, False]]),
    )  # fmt: skip
    exact = solve_exact(problem)
    assert exact.assignment.tolist() == [1, 0]
    assert not breaks_a_promise(problem, plan(problem, [1, 0]), exact)
    assert breaks_a_promise(problem, plan(problem, [0, 1]), exact)  # a hint ignored
    over = WindowProblem(problem.quality, problem.cost, "budget", window_budget_usd=2.0,
                         capacities=(None, 1))  # fmt: skip
    assert breaks_a_promise(over, plan(over, [1, 1]), solve_exact(over))  # over a capacity
    tight = WindowProblem(problem.quality, problem.cost, "budget", window_budget_usd=1.0)
    assert breaks_a_promise(tight, plan(tight, [1, 1]), solve_exact(tight))  # over budget


def test_the_shortfall_is_relative_to_the_optimum_in_either_mode() -> None:
    quality_mode = WindowProblem(
        np.array([[0.5, 0.6], [0.5, 0.9]]), np.array([[0.0, 1.0], [0.0, 3.0]]),
        mode="quality", quality_target=0.55,
    )  # fmt: skip
    assert shortfall(quality_mode, plan(quality_mode, [1, 0]), plan(quality_mode, [0, 1])) == 2.0
    budget_mode = WindowProblem(quality_mode.quality, quality_mode.cost, "budget",
                                window_budget_usd=3.0)  # fmt: skip
    best, worse = plan(budget_mode, [0, 1]), plan(budget_mode, [1, 0])
    assert shortfall(budget_mode, best, worse) == pytest.approx(0.3 / 1.4)


def test_every_kind_of_window_is_fuzzed_and_the_fast_path_breaks_no_promise() -> None:
    rows = list(run(24, seed=3))
    assert {(row.capped, row.mode) for row in rows} == {
        (False, "budget"),
        (False, "quality"),
        (True, "budget"),
        (True, "quality"),
    }
    assert all(row.compared > 0 and row.broken == 0 for row in rows)
    assert all(gap >= 0.0 for row in rows for gap in row.gaps)
