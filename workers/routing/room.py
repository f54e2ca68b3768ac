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
        self.capped = bool(np.isfinite(self.caps).any())
        self.taken = sum(self._value(int(r), int(self.fixed[r])) for r in rows)
        rest = self.fixed == NONE
        self.plan = np.full(n, NONE, dtype=np.int64)
        found = best_within(self.score[rest], self.caps) if (self.caps >= 0).all() else None
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
        had cost the router about 0.4 ms of CPU per query). With capacities a shadow
        takes only a slot no answer uses (taking one would push an answer to a dearer
        or worse model, a cost its allowance never saw), and an exploration whose
        model has room keeps the rest's plan; only one that needs a full model's
        slot re-plans the rest."""
        if not self.planned:
            return False
        leaves = not shadow and self.plan[row] != NONE  # the query leaves the rest
        caps, replanned = self.caps, None
        if self.capped:
            caps = caps.copy()
            caps[model] -= 1
            if caps[model] < 0:
                return False
            load = np.bincount(self.plan[self.plan != NONE], minlength=self.problem.n_models)
            if shadow and load[model] > caps[model]:
                return False  # a shadow takes only a slot no answer uses
            if shadow or load[model] <= caps[model]:  # the plan (less the query) still fits
                rest_value = self.rest_value - (
                    float(self.score[row, self.plan[row]]) if leaves else 0.0
                )
            else:  # the rest must be re-planned exactly
                replanned, rest_value = self._replanned(row, leaves, caps)
                if replanned is None:
                    return False
        else:
            rest_value = self.rest_value
            if leaves:
                rest_value -= float(self.score[row, self.plan[row]])
        taken = self.taken + self._value(row, model, shadow)
        if not self._keeps_limit(taken + rest_value):
            return False
        self.caps, self.taken, self.rest_value = caps, taken, rest_value
        if shadow:
            self.extra[row] = model
        else:
            self.fixed[row], self.plan[row] = model, NONE
        if replanned is not None:
            self.plan[replanned[0]] = replanned[1]
        return True

    def _replanned(
        self, row: int, leaves: bool, caps: NDArray[np.float64]
    ) -> tuple[tuple[NDArray[np.int64], NDArray[np.int64]] | None, float]:
        """The rest's best plan within `caps` (without `row` when it leaves), from the
        current one, and its value; None when the rest no longer fits."""
        rest = self.plan != NONE
        rest[row] = rest[row] and not leaves
        rows = np.flatnonzero(rest)
        plan = best_within(self.score[rows], caps, self.plan[rows])
        if plan is None:
            return None, 0.0
        return (rows, plan), float(self.score[rows, plan].sum())

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
