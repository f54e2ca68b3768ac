"""`omnirouter bench solver`: exact ILP vs the Lagrangian fast path, on windows shaped
like real traffic (11 models whose prices span 60x, as in RouterBench)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from workers.routing.optimizer import Mode, WindowProblem, solve_exact, solve_fast


def synthetic_window(
    n_queries: int, n_models: int = 11, seed: int = 0
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Quality and cost matrices with RouterBench's shape: dearer models are better on
    average, queries differ in difficulty and length, prices span about 60x."""
    rng = np.random.default_rng(seed)
    model_skill = np.sort(rng.uniform(-0.5, 2.0, n_models))
    price_per_token = np.geomspace(1e-7, 6e-6, n_models) * rng.uniform(0.7, 1.3, n_models)
    difficulty = rng.normal(0, 1, (n_queries, 1))
    affinity = rng.normal(0, 0.8, (n_queries, n_models))
    quality = 1 / (1 + np.exp(-(model_skill[None, :] - difficulty + affinity)))
    tokens = rng.lognormal(5.5, 0.8, (n_queries, 1))
    cost = tokens * price_per_token[None, :] * rng.uniform(0.8, 1.2, (n_queries, n_models))
    return quality, cost


def problem_for(
    quality: NDArray[np.float64],
    cost: NDArray[np.float64],
    mode: Mode,
    capacities: tuple[int | None, ...] | None = None,
) -> WindowProblem:
    """A binding constraint: halfway between the cheapest plan and the best plan."""
    rows = np.arange(quality.shape[0])
    cheapest, best = cost.argmin(axis=1), quality.argmax(axis=1)
    if mode == "budget":
        budget = (cost[rows, cheapest].sum() + cost[rows, best].sum()) / 2
        return WindowProblem(
            quality, cost, "budget", window_budget_usd=float(budget), capacities=capacities
        )
    target = (quality[rows, cheapest].mean() + quality[rows, best].mean()) / 2
    return WindowProblem(
        quality, cost, "quality", quality_target=float(target), capacities=capacities
    )


@dataclass(frozen=True)
class SolverRow:
    n_queries: int
    mode: Mode
    exact_median_seconds: float
    fast_median_seconds: float
    gap_percent_worst: float
    exact_status: str
    fast_feasible: bool


def run(
    sizes: tuple[int, ...] = (100, 500, 1000, 2000, 5000),
    repeats: int = 3,
    seed: int = 0,
    with_capacities: bool = False,
) -> Iterator[SolverRow]:
    """With capacities, no model may take more than a fifth of a window."""
    modes: tuple[Mode, ...] = ("budget", "quality")
    for n in sizes:
        for mode in modes:
            exact_times, fast_times, gaps, statuses = [], [], [], set()
            feasible = True
            for r in range(repeats):
                quality, cost = synthetic_window(n, seed=seed + r)
                capacities = (math.ceil(n / 5),) * quality.shape[1] if with_capacities else None
                problem = problem_for(quality, cost, mode, capacities)
                exact = solve_exact(problem, time_limit_seconds=60)
                fast = solve_fast(problem)
                exact_times.append(exact.solve_seconds)
                fast_times.append(fast.solve_seconds)
                statuses.add(exact.status)
                best, got = exact.objective(mode), fast.objective(mode)
                gaps.append(100 * abs(best - got) / abs(best))
                feasible &= problem.meets_limit(fast.assignment)
            yield SolverRow(
                n_queries=n,
                mode=mode,
                exact_median_seconds=statistics.median(exact_times),
                fast_median_seconds=statistics.median(fast_times),
                gap_percent_worst=max(gaps),
                exact_status="/".join(sorted(statuses)),
                fast_feasible=feasible,
            )
