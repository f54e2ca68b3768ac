"""`omnirouter bench solver-fuzz`: the fast path against the exact ILP on many small
random windows (5-60 queries, 2-6 models, with and without capacities, hints and
near-ties), where `bench solver`'s large synthetic windows hide its worst cases:
how often, and by how much, its plan is worse than the optimum, and whether it
ever breaks a capacity, a hint, or the budget or target the exact plan keeps."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from workers.bench.solver import synthetic_window
from workers.routing.optimizer import (
    CapacityError,
    Mode,
    WindowPlan,
    WindowProblem,
    solve_exact,
    solve_fast,
)

EXACT_TIME_LIMIT_SECONDS = 20.0


@dataclass
class FuzzRow:
    """One kind of window (capped or not, one mode): what the fast path did there."""

    capped: bool
    mode: Mode
    windows: int = 0
    compared: int = 0  # windows whose exact plan is proven optimal
    over_1_percent: int = 0
    over_10_percent: int = 0
    broken: int = 0  # a capacity or hint broken, or a limit the exact plan keeps missed
    gaps: list[float] = field(default_factory=list)

    @property
    def worst_gap(self) -> float:
        return max(self.gaps, default=0.0)

    @property
    def mean_gap(self) -> float:
        """Infinite gaps (the exact plan free, the fast one not) count as 1000%."""
        return float(np.mean(np.minimum(self.gaps, 10.0))) if self.gaps else 0.0


def random_window(rng: np.random.Generator, capped: bool, mode: Mode) -> WindowProblem:
    """Half RouterBench-shaped, half uniform; a third coarse (ties); 40% with hints;
    capped windows give each model a random capacity (some none) and most a
    fallback; the limit lies between the cheapest and the best plan."""
    n, m = int(rng.integers(5, 61)), int(rng.integers(2, 7))
    if rng.uniform() < 0.5:
        quality, cost = synthetic_window(n, m, seed=int(rng.integers(1 << 30)))
    else:
        quality = rng.uniform(0, 1, (n, m))
        cost = rng.uniform(0.0, 0.01, (n, m)) * rng.uniform(0.2, 5, m)[None, :]
    if rng.uniform() < 0.3:
        quality, cost = np.round(quality, 1), np.round(cost, 3)
    allowed = np.ones((n, m), dtype=bool)
    if rng.uniform() < 0.4:
        allowed = rng.uniform(size=(n, m)) > rng.uniform(0.05, 0.4)
        allowed[np.arange(n), rng.integers(0, m, n)] = True
    capacities, fallback = None, None
    if capped:
        most = max(2, int(rng.uniform(0.2, 1.6) * n))
        capacities = tuple(
            None if rng.uniform() < 0.15 else int(rng.integers(0, most)) for _ in range(m)
        )
        fallback = int(rng.integers(0, m)) if rng.uniform() < 0.7 else None
    rows, share = np.arange(n), float(rng.uniform(0.05, 0.95))
    cheapest = np.where(allowed, cost, np.inf).argmin(axis=1)
    best = np.where(allowed, quality, -np.inf).argmax(axis=1)
    budget = target = None
    if mode == "budget":
        low, high = cost[rows, cheapest].sum(), cost[rows, best].sum()
        budget = float(low + share * (high - low))
    else:
        low, high = quality[rows, cheapest].mean(), quality[rows, best].mean()
        target = float(low + share * (high - low))
    return WindowProblem(
        quality, cost, mode, window_budget_usd=budget, quality_target=target,
        capacities=capacities, fallback_model=fallback,
        tie_tolerance=float(rng.choice([0.0, 0.0, 0.02])), allowed=allowed,
    )  # fmt: skip


def shortfall(problem: WindowProblem, exact: WindowPlan, fast: WindowPlan) -> float:
    """How much worse the fast plan is, relative to the exact one: less preferred
    quality in budget mode, more cost in quality mode (0 or below: as good)."""
    if problem.mode == "budget":
        best = exact.objective("budget")
        return (best - fast.objective("budget")) / max(abs(best), 1e-9)
    if exact.total_cost_usd <= 1e-12:
        return 0.0 if fast.total_cost_usd <= 1e-12 else math.inf
    return (fast.total_cost_usd - exact.total_cost_usd) / exact.total_cost_usd


def breaks_a_promise(problem: WindowProblem, fast: WindowPlan, exact: WindowPlan) -> bool:
    """A capacity exceeded, a hint ignored, or the budget or target missed where the
    exact plan keeps it."""
    counts = np.bincount(fast.assignment, minlength=problem.n_models)
    rows = np.arange(problem.n_queries)
    return bool(
        (counts > problem.capacity_array).any()
        or not problem.permitted[rows, fast.assignment].all()
        or (problem.meets_limit(exact.assignment) and not problem.meets_limit(fast.assignment))
    )


def run(n_windows: int, seed: int = 0) -> Iterator[FuzzRow]:
    """The four kinds of window in turn, `n_windows` in all; windows whose capacities
    cannot hold them (a CapacityError at construction) are skipped."""
    rng = np.random.default_rng(seed)
    rows = {(capped, mode): FuzzRow(capped, mode) for capped in (False, True)
            for mode in ("budget", "quality")}  # fmt: skip
    for k in range(n_windows):
        row = rows[bool(k % 2), "budget" if (k // 2) % 2 else "quality"]
        try:
            problem = random_window(rng, row.capped, row.mode)
            problem.capacity_array  # noqa: B018 (raises CapacityError when nothing fits)
        except CapacityError:
            continue
        exact = solve_exact(problem, EXACT_TIME_LIMIT_SECONDS)
        fast = solve_fast(problem)
        row.windows += 1
        row.broken += breaks_a_promise(problem, fast, exact)
        if exact.status != "optimal" or not problem.meets_limit(fast.assignment):
            continue
        gap = shortfall(problem, exact, fast)
        row.compared += 1
        row.over_1_percent += gap > 0.01
        row.over_10_percent += gap > 0.10
        row.gaps.append(max(gap, 0.0))
    yield from rows.values()
