"""A first-stage window whose panel has capped models (ROUTER_MODEL_CAPACITIES).

A probe takes a slot of every panel model at once, so a capped panel model j
must hold its direct answers and every probe: load(j) + probes <= cap(j). The
window optimiser's capacities are per column, and a probe option is a column of
its own, so this group bound is met by construction instead: the window is
solved with its probes limited to P queries (probe options allowed for those
only) and each capped panel model's direct answers to its cap less P. P is
tried at a few shares of what an unbounded solve probed (no more than the
panel's room), the queries kept for probing being those that solve's probes
gained most on, and the best plan of those tried is kept. Each candidate keeps
the bound; P = 0 (every query answered directly) is always one when nothing
else is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from workers.routing.optimizer import Method, WindowPlan, WindowProblem, solve

# The probe counts tried, as shares of the most a window may probe.
PROBE_SHARES = (1.0, 0.75, 0.5, 0.25)


def panel_room(problem: WindowProblem, panel: Sequence[int]) -> float:
    """The most probes the panel's capacities hold (inf: no panel model capped)."""
    caps = problem.capacity_array
    return min((float(caps[j]) for j in panel), default=math.inf)


def keeps_panel_caps(
    problem: WindowProblem, assignment: NDArray[np.int64], n_models: int, panel: Sequence[int]
) -> bool:
    """Does every panel model hold its direct answers and every probe?"""
    caps = problem.capacity_array
    load = np.bincount(assignment[assignment < n_models], minlength=n_models)
    probes = int((assignment >= n_models).sum())
    return all(load[j] + probes <= caps[j] for j in panel)


def solve_with_probes(
    problem: WindowProblem,
    n_models: int,
    panel: Sequence[int],
    solver: Method,
    time_limit_seconds: float,
) -> WindowPlan:
    """The window's plan with probe options (module doc): as the optimiser solves it
    when no panel model is capped, else the best plan of a few probe counts."""
    plan = solve(problem, solver, time_limit_seconds)
    if not math.isfinite(panel_room(problem, panel)) or keeps_panel_caps(
        problem, plan.assignment, n_models, panel
    ):
        return plan
    order = _by_probe_gain(problem, plan.assignment, n_models)
    most = int(min(len(order), panel_room(problem, panel)))
    counts = sorted({math.ceil(most * share) for share in PROBE_SHARES}, reverse=True)
    tried = [
        solve(_probes_limited(problem, n_models, panel, order[:count]), solver, time_limit_seconds)
        for count in counts
    ]
    return max(tried, key=lambda p: (problem.meets_limit(p.assignment), p.objective(problem.mode)))


def _by_probe_gain(
    problem: WindowProblem, assignment: NDArray[np.int64], n_models: int
) -> NDArray[np.int64]:
    """The queries `assignment` probes, those whose probe option gains most over their
    best direct answer first."""
    rows = np.flatnonzero(assignment >= n_models)
    direct = problem.masked(problem.quality)[rows, :n_models].max(axis=1)
    gain = problem.quality[rows, assignment[rows]] - direct
    return rows[np.argsort(-gain, kind="stable")]


def _probes_limited(
    problem: WindowProblem, n_models: int, panel: Sequence[int], probing: NDArray[np.int64]
) -> WindowProblem:
    """The window with probe options allowed only to the `probing` queries, and each
    panel model's capacity less a slot for each of them."""
    allowed = problem.permitted.copy()
    may_probe = np.zeros(problem.n_queries, dtype=bool)
    may_probe[probing] = True
    allowed[:, n_models:] &= may_probe[:, None]
    caps = problem.capacity_array.copy()
    caps[list(panel)] -= len(probing)
    return WindowProblem(
        problem.quality,
        problem.cost,
        problem.mode,
        window_budget_usd=problem.window_budget_usd,
        quality_target=problem.quality_target,
        capacities=tuple(None if math.isinf(c) else int(c) for c in caps),
        fallback_model=problem.fallback_model,
        tie_tolerance=problem.tie_tolerance,
        uncertainty=problem.uncertainty,
        allowed=allowed,
    )
