"""Is there room left in a window? Exploration and shadow answers take some of its
queries, budget and capacity before the rest of it is planned again; each is
accepted only if the rest can still be planned within what they leave."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from workers.routing.optimizer import WindowProblem, best_within

# A query with no model fixed (not explored) or with no shadow.
NONE = -1
# Sums of floats compared with the limit, and with each other.
LIMIT_TOLERANCE = 1e-12


class WindowRoom:
    """What exploration and shadows have taken of a window so far, and the best the
    rest can still do: in budget mode its cheapest plan, in quality mode its best,
    on allowed pairs within the capacities left (exact: a capacity or a hint can
    make a query's cheapest or best model unavailable). `fixed`: answers already
    chosen (explored), taken as they are."""

    def __init__(self, problem: WindowProblem, fixed: NDArray[np.int64] | None = None) -> None:
        self.problem = problem
        n = problem.n_queries
        budget_mode = problem.mode == "budget"
        self.score = problem.masked(-problem.cost if budget_mode else problem.quality)
        if budget_mode:
            assert problem.window_budget_usd is not None
            self.limit = -problem.window_budget_usd
        else:
            assert problem.quality_target is not None
            self.limit = problem.quality_target * n
        self.fixed = np.full(n, NONE, dtype=np.int64) if fixed is None else fixed.copy()
        self.extra = np.full(n, NONE, dtype=np.int64)
        rows = np.flatnonzero(self.fixed != NONE)
        self.caps = problem.capacity_array() - np.bincount(
            self.fixed[rows], minlength=problem.n_models
        )
        self.taken = self._value(rows, self.fixed[rows])
        rest = self.fixed == NONE
        self.plan = np.full(n, NONE, dtype=np.int64)
        found = best_within(self.score[rest], self.caps) if (self.caps >= 0).all() else None
        if found is not None:
            self.plan[rest] = found

    def take(self, row: int, model: int, shadow: bool) -> bool:
        """Fix query `row`'s answer on `model` (shadow False: an exploration) or give
        it a shadow there, if the rest of the window still fits; says whether."""
        caps = self.caps.copy()
        caps[model] -= 1
        rest = (self.fixed == NONE) & (self.plan != NONE)
        if not shadow:
            rest[row] = False
        if (caps < 0).any() or (self.plan[self.fixed == NONE] == NONE).any():
            return False
        rows = np.flatnonzero(rest)
        if np.isfinite(caps).any():
            plan = best_within(self.score[rows], caps, self.plan[rows])
            if plan is None:
                return False
        else:
            plan = self.score[rows].argmax(axis=1)
        taken = self.taken + self._value(np.array([row]), np.array([model]), shadow)
        if not self._keeps_limit(taken + float(self.score[rows, plan].sum())):
            return False
        self.caps, self.taken = caps, taken
        if shadow:
            self.extra[row] = model
        else:
            self.fixed[row], self.plan[row] = model, NONE
        self.plan[rows] = plan
        return True

    def _keeps_limit(self, value: float) -> bool:
        """Whether the window, at `value` after a step, still keeps its limit, or,
        when it could not anyway (a target out of reach, a budget its cheapest plan
        exceeds), loses nothing by the step (a shadow beside unchanged answers)."""
        rest = self.fixed == NONE
        before = self.taken + float(self.score[rest, self.plan[rest]].sum())
        return value >= self.limit - LIMIT_TOLERANCE or value >= before - LIMIT_TOLERANCE

    def _value(
        self, rows: NDArray[np.int64], models: NDArray[np.int64], shadow: bool = False
    ) -> float:
        """What answers (or shadows) take of the limit's side: minus their cost in
        budget mode, their quality in quality mode (a shadow's: none)."""
        if self.problem.mode == "budget":
            return -float(self.problem.cost[rows, models].sum())
        return 0.0 if shadow else float(self.problem.quality[rows, models].sum())
