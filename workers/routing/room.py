"""Is there room left in a window? Exploration and shadow answers take some of its
queries, budget and capacity before the rest of it is planned again; each is
accepted only if the rest can still be planned within what they leave."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from workers.routing.optimizer import WindowProblem, within_capacity

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
        fixed = np.full(n, NONE, dtype=np.int64) if fixed is None else fixed
        rows = np.flatnonzero(fixed != NONE)
        self.caps = problem.capacity_array - np.bincount(fixed[rows], minlength=problem.n_models)
        self.capped = bool(np.isfinite(self.caps).any())
        self.taken = sum(self._value(int(r), int(fixed[r])) for r in rows)
        rest = fixed == NONE
        # The rest's plan; NONE for a query fixed (explored) before or since.
        self.plan = np.full(n, NONE, dtype=np.int64)
        found = within_capacity(self.score[rest], self.caps) if (self.caps >= 0).all() else None
        self.planned = found is not None  # else the rest cannot be planned at all
        if found is not None:
            self.plan[rest] = found
        # What the rest's plan takes of the limit's side (kept in step with `plan`).
        self.rest_value = float(self.score[rest, self.plan[rest]].sum()) if self.planned else 0.0

    def take(self, row: int, model: int, shadow: bool) -> bool:
        """Fix query `row`'s answer on `model` (shadow False: an exploration) or give
        it a shadow there, if the rest of the window still fits; says whether.

        Without capacities each query's best is its own, so a step changes only its
        query's part of the rest (a few operations, not a re-plan: a window whose
        target is out of reach refuses most candidates, and re-planning each one
        had cost the router about 0.4 ms of CPU per query). With capacities a step
        takes only a slot the rest's plan leaves free, so that plan stays: a shadow
        in an answer's slot would push the answer to a dearer or worse model (a cost
        its allowance never saw), and re-planning the rest for every candidate had
        taken seconds on a window of 2,000 queries."""
        if not self.planned:
            return False
        leaves = not shadow and self.plan[row] != NONE  # the query leaves the rest
        caps = self.caps
        if self.capped:
            caps = caps.copy()
            caps[model] -= 1
            if caps[model] < 0:
                return False
            load = np.bincount(self.plan[self.plan != NONE], minlength=self.problem.n_models)
            if load[model] > caps[model]:
                return False  # only a slot the rest's plan leaves free
        rest_value = self.rest_value
        if leaves:  # the rest's plan less the query, which still fits (a lower bound)
            rest_value -= float(self.score[row, self.plan[row]])
        taken = self.taken + self._value(row, model, shadow)
        if not self._keeps_limit(taken + rest_value):
            return False
        self.caps, self.taken, self.rest_value = caps, taken, rest_value
        if not shadow:
            self.plan[row] = NONE  # its answer is fixed now
        return True

    def _keeps_limit(self, value: float) -> bool:
        """Whether the window, at `value` after a step, still keeps its limit, or,
        when it could not anyway (a target out of reach, a budget its cheapest plan
        exceeds), loses nothing by the step (a shadow beside unchanged answers)."""
        before = self.taken + self.rest_value
        return value >= self.limit - LIMIT_TOLERANCE or value >= before - LIMIT_TOLERANCE

    def _value(self, row: int, model: int, shadow: bool = False) -> float:
        """What an answer (or a shadow) takes of the limit's side: minus its cost in
        budget mode, its quality in quality mode (a shadow's: none)."""
        if self.problem.mode == "budget":
            return -float(self.problem.cost[row, model])
        return 0.0 if shadow else float(self.problem.quality[row, model])
