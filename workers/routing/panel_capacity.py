"""A first-stage window whose panel has capped models (ROUTER_MODEL_CAPACITIES).

A probe takes a slot of every panel model at once, so a capped panel model j
must hold its direct answers and every probe: load(j) + probes <= cap(j). The
window optimiser's capacities are per column, and a probe option is a column of
its own, so this group bound is met by construction instead: the window is
solved with its probes limited to P queries (probe options allowed for those
only) and each capped panel model's cap less P. P is tried at a few shares of
what an unbounded solve probed (no more than the panel's caps), the queries
kept for probing being those that solve's probes gained most on. Of the plans
that keep every panel cap as configured and every other model within the
direct-only window's capacities (where the fallback takes what the caps cannot
hold; a limited solve may lift a cap where the hints or the
window's size leave it no choice; such a plan is dropped), the best is kept;
none: the window is answered directly (`plan_first_stage`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from workers.routing.optimizer import CapacityError, Method, WindowPlan, WindowProblem, solve

# The probe counts tried, as shares of the most a window may probe.
PROBE_SHARES = (1.0, 0.75, 0.5, 0.25)


def panel_caps(problem: WindowProblem, panel: Sequence[int]) -> dict[int, int]:
    """The configured caps of the panel's capped models (none: an unbounded panel)."""
    caps = problem.capacities
    if caps is None:
        return {}
    return {j: int(c) for j in panel if (c := caps[j]) is not None}


def keeps_panel_caps(
    problem: WindowProblem, assignment: NDArray[np.int64], n_models: int, panel: Sequence[int]
) -> bool:
    """Does every capped panel model hold its direct answers and every probe, within
    its configured cap?"""
    load = np.bincount(assignment[assignment < n_models], minlength=n_models)
    probes = int((assignment >= n_models).sum())
    return all(load[j] + probes <= cap for j, cap in panel_caps(problem, panel).items())


def keeps_caps(
    problem: WindowProblem,
    assignment: NDArray[np.int64],
    n_models: int,
    panel: Sequence[int],
    direct_caps: NDArray[np.float64],
) -> bool:
    """`keeps_panel_caps`, and every other model within `direct_caps`, the capacity
    the direct-only window gives it: a plan whose probes were limited must not push
    the queries the panel can no longer take onto another capped model. Not the
    capacities of `problem`: its probe options are uncapped columns, so there the
    fallback never takes what the caps cannot hold, and every plan leaving it the
    window's overflow was refused (a window larger than its caps never probed)."""
    load = np.bincount(assignment[assignment < n_models], minlength=n_models)
    others = [j for j in range(n_models) if j not in panel_caps(problem, panel)]
    within = all(load[j] <= direct_caps[j] for j in others)
    return within and keeps_panel_caps(problem, assignment, n_models, panel)


def solve_with_probes(
    problem: WindowProblem,
    n_models: int,
    panel: Sequence[int],
    solver: Method,
    time_limit_seconds: float,
    direct_caps: NDArray[np.float64],
) -> WindowPlan | None:
    """The window's plan with probe options (module doc): as the optimiser solves it
    when it keeps the panel's caps, else the best plan of a few probe counts that
    does; None: none does. `direct_caps`: the direct-only window's capacities
    (`keeps_caps`)."""
    plan = solve(problem, solver, time_limit_seconds)
    caps = panel_caps(problem, panel)
    if not caps or keeps_panel_caps(problem, plan.assignment, n_models, panel):
        return plan
    order = _by_probe_gain(problem, plan.assignment, n_models)
    most = min(len(order), *caps.values())
    counts = sorted({math.ceil(most * share) for share in PROBE_SHARES} - {0}, reverse=True)
    kept = []
    for count in counts:
        try:
            limited = _probes_limited(problem, n_models, caps, order[:count])
            candidate = solve(limited, solver, time_limit_seconds)
        except CapacityError:  # the caps less `count` cannot hold the other queries
            continue
        if keeps_caps(problem, candidate.assignment, n_models, panel, direct_caps):
            kept.append(candidate)
    return max(kept, key=lambda p: _rank(problem, p), default=None)


def room_window(
    problem: WindowProblem, n_models: int, panel: Sequence[int], plan: WindowPlan
) -> WindowProblem:
    """The window exploration must leave room in, given its plan: probes allowed only
    to the queries the plan probes, the panel's caps less as many. The room plans
    per column, so on `problem` it would count on probes beyond the panel's caps;
    here every plan it finds keeps them (and the plan itself is one)."""
    probing = np.flatnonzero(plan.assignment >= n_models)
    return _probes_limited(problem, n_models, panel_caps(problem, panel), probing)


def _rank(problem: WindowProblem, plan: WindowPlan) -> tuple[bool, float]:
    """Plans keeping the window's limit first, by objective; the others by quality
    (in quality mode the nearest to the target)."""
    meets = problem.meets_limit(plan.assignment)
    return meets, plan.objective(problem.mode) if meets else plan.total_quality


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
    problem: WindowProblem, n_models: int, caps: dict[int, int], probing: NDArray[np.int64]
) -> WindowProblem:
    """The window with probe options allowed only to the `probing` queries, and each
    capped panel model's configured cap less a slot for each of them (it is no
    fallback here: lifted, it would take probes beyond its cap)."""
    allowed = problem.permitted.copy()
    may_probe = np.zeros(problem.n_queries, dtype=bool)
    may_probe[probing] = True
    allowed[:, n_models:] &= may_probe[:, None]
    capacities = list(problem.capacities or [None] * problem.n_models)
    for j, cap in caps.items():
        capacities[j] = cap - len(probing)
    fallback = problem.fallback_model
    return WindowProblem(
        problem.quality,
        problem.cost,
        problem.mode,
        window_budget_usd=problem.window_budget_usd,
        quality_target=problem.quality_target,
        capacities=tuple(capacities),
        fallback_model=None if fallback in caps else fallback,
        tie_tolerance=problem.tie_tolerance,
        uncertainty=problem.uncertainty,
        allowed=allowed,
    )
