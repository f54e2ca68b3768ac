"""Assign every query of a window to exactly one model (the OmniRouter optimisation).

For queries i and models j, x_ij in {0, 1} and sum_j x_ij = 1:
- budget mode:  maximise sum q_ij x_ij  s.t.  sum c_ij x_ij <= B,            sum_i x_ij <= L_j
- quality mode: minimise sum c_ij x_ij  s.t.  (1/N) sum q_ij x_ij >= alpha,  sum_i x_ij <= L_j

Ties and near-ties go to the cheaper model: wherever the solvers seek quality
they maximise `preference`, the quality less `tie_tolerance` times the cost
as a share of the query's dearest option, so a model that costs more must be
better by more than the tolerance to be chosen over a cheaper one (with
nothing known, every prediction ties, and the cheapest plan is the answer).

`solve_exact` is the reference (PuLP, HiGHS when installed, else CBC).
`solve_fast` is Lagrangian dual decomposition: the coupling constraint gets a
multiplier found by bisection, each capacity gets a price raised until the
model's load fits, every query then picks its best model on its own (a few
exchanges make that plan exact where a capacity binds), and a greedy pass
spends what is left of the slack. Both never drop a query: an unreachable
budget or target falls back to the cheapest or the best plan, and the plan's
status says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import pulp
from numpy.typing import NDArray

from schemas.events import SolverStatus as PlanStatus

Mode = Literal["budget", "quality"]
Method = Literal["exact", "fast"]
_IlpStatus = Literal["optimal", "out_of_time", "infeasible"]

# Slack when checking a plan against its budget or target, in units of one
# query's mean cost (budget) or of quality (target): solvers work to ~1e-7.
FEASIBILITY_TOLERANCE = 1e-6


class CapacityError(ValueError):
    """The models' capacities cannot hold the window and no fallback model is set."""


@dataclass(frozen=True)
class Uncertainty:
    """How far the predicted qualities may be off together: each query's cluster of
    stored queries and, per model, the variance of the model's mean there. Queries
    of one cluster share that error (the cluster's mean is one estimate), so a plan's
    predicted gain over a single model is only as sure as those means."""

    cluster: NDArray[np.int64]  # (n_queries,)
    variance: NDArray[np.float64]  # (n_queries, n_models)

    def take(self, rows: NDArray[np.int64]) -> Uncertainty:
        return Uncertainty(self.cluster[rows], self.variance[rows])


@dataclass(frozen=True)
class WindowProblem:
    """One window: predicted quality and cost of every (query, model) pair."""

    quality: NDArray[np.float64]  # (n_queries, n_models), in [0, 1]
    cost: NDArray[np.float64]  # (n_queries, n_models), USD, >= 0
    mode: Mode
    window_budget_usd: float | None = None
    quality_target: float | None = None
    # Most queries per model per window; None (or a None entry) is unlimited.
    capacities: tuple[int | None, ...] | None = None
    # Model index that takes the overflow when capacities cannot hold the window.
    fallback_model: int | None = None
    # Quality a model must gain to be worth its whole extra cost (see `preference`).
    tie_tolerance: float = 0.0
    # Budget mode: a plan must beat the best affordable single model by more than
    # its uncertainty (`keep_single_model`); None: no such check.
    uncertainty: Uncertainty | None = None
    # (n_queries, n_models): the pairs a plan may use (the queries' hints); a hard
    # constraint, never traded for capacity or budget. None: every pair.
    allowed: NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        quality = np.asarray(self.quality, dtype=float)
        cost = np.asarray(self.cost, dtype=float)
        object.__setattr__(self, "quality", quality)
        object.__setattr__(self, "cost", cost)
        if quality.ndim != 2 or quality.shape != cost.shape or quality.shape[1] == 0:
            raise ValueError(f"quality {quality.shape} and cost {cost.shape} must be equal 2-D")
        if not (np.isfinite(quality).all() and np.isfinite(cost).all()):
            raise ValueError("quality and cost must be finite (predict missing values first)")
        if (cost < 0).any():
            raise ValueError("cost must be >= 0")
        if self.mode == "budget" and (self.window_budget_usd is None or self.window_budget_usd < 0):
            raise ValueError("budget mode needs window_budget_usd >= 0")
        if self.mode == "quality" and self.quality_target is None:
            raise ValueError("quality mode needs quality_target")
        if self.capacities is not None and len(self.capacities) != self.n_models:
            raise ValueError(f"{len(self.capacities)} capacities for {self.n_models} models")
        if self.fallback_model is not None and not 0 <= self.fallback_model < self.n_models:
            raise ValueError(f"fallback model {self.fallback_model} out of range")
        if self.tie_tolerance < 0:
            raise ValueError("tie_tolerance must be >= 0")
        if self.uncertainty is not None and (
            self.uncertainty.variance.shape != quality.shape
            or self.uncertainty.cluster.shape != (quality.shape[0],)
        ):
            raise ValueError("uncertainty must hold a cluster per query and a variance per pair")
        allowed = (
            np.ones(quality.shape, dtype=bool)
            if self.allowed is None
            else np.asarray(self.allowed, dtype=bool)
        )
        if allowed.shape != quality.shape or not allowed.any(axis=1).all():
            raise ValueError("allowed must match quality and allow every query some model")
        object.__setattr__(self, "permitted", allowed)
        # The tie penalty is relative to the dearest option the query may take: a
        # forbidden model must not change the choice between allowed ones.
        dearest = np.where(allowed, cost, 0.0).max(axis=1, keepdims=True)
        relative_cost = np.divide(cost, dearest, out=np.zeros_like(cost), where=dearest > 0)
        object.__setattr__(self, "preference", quality - self.tie_tolerance * relative_cost)

    # Quality less the tie penalty: what the solvers maximise (set in __post_init__).
    preference: NDArray[np.float64] = field(init=False, repr=False, compare=False)
    # `allowed`, every pair True when None (set in __post_init__).
    permitted: NDArray[np.bool_] = field(init=False, repr=False, compare=False)

    def permitted_within(self, allowed: NDArray[np.bool_] | None) -> NDArray[np.bool_]:
        """The pairs a plan may use, narrowed by a stage's own mask (`allowed`; None:
        no narrowing); a new array, the caller's to change."""
        return self.permitted.copy() if allowed is None else allowed & self.permitted

    def masked(self, score: NDArray[np.float64]) -> NDArray[np.float64]:
        """`score` with every forbidden pair at -inf: what the fast path ranks."""
        return np.where(self.permitted, score, -np.inf)

    @property
    def n_queries(self) -> int:
        return int(self.quality.shape[0])

    @property
    def n_models(self) -> int:
        return int(self.quality.shape[1])

    def meets_limit(self, assignment: NDArray[np.int64]) -> bool:
        """Does the plan keep the budget (budget mode) or reach the target (quality mode)?"""
        rows = np.arange(self.n_queries)
        if not self.permitted[rows, assignment].all():
            return False
        if self.mode == "budget":
            return bool(self.cost[rows, assignment].sum() <= _budget(self))
        return bool(self.quality[rows, assignment].sum() >= _target_total(self))

    @cached_property
    def capacity_array(self) -> NDArray[np.float64]:
        """Capacities as floats (inf: unlimited), with the fallback model made unlimited
        when the window would not fit otherwise, or when the allowed pairs would not
        and the fallback may take some of the queries left over. Where they cannot
        fit the window even so (queries that may take only a full model), capacities
        yield and the hints hold, by no more than that takes (`overflow`): one such
        query must not free the whole window of its capacities. Worked out once per
        problem (several steps of a solve read it) and read-only."""
        caps = self._capacities_resolved()
        caps.setflags(write=False)
        return caps

    def _capacities_resolved(self) -> NDArray[np.float64]:
        if self.capacities is None:
            return np.full(self.n_models, np.inf)
        caps = np.array([np.inf if c is None else float(c) for c in self.capacities])
        if caps.sum() < self.n_queries:
            if self.fallback_model is None:
                raise CapacityError(
                    f"capacities hold {int(caps.sum())} queries, the window has "
                    f"{self.n_queries}; raise ROUTER_MODEL_CAPACITIES or set ROUTER_FALLBACK_MODEL"
                )
            caps[self.fallback_model] = np.inf
        if self.permitted.all():
            return caps
        extra = overflow(self.permitted, caps)
        if extra.any() and self.fallback_model is not None:
            lifted = caps.copy()
            lifted[self.fallback_model] = np.inf
            extra_lifted = overflow(self.permitted, lifted)
            if extra_lifted.sum() < extra.sum():  # only where the fallback may take them
                caps, extra = lifted, extra_lifted
        return caps + extra


@dataclass(frozen=True)
class WindowPlan:
    """The chosen model of every query, and how the solve went."""

    assignment: NDArray[np.int64]  # (n_queries,), model index per query
    status: PlanStatus
    solver: str
    solve_seconds: float
    total_cost_usd: float = field(init=False)
    total_quality: float = field(init=False)
    total_preference: float = field(init=False)

    def __init__(
        self,
        problem: WindowProblem,
        assignment: NDArray[np.int64],
        status: PlanStatus,
        solver: str,
        solve_seconds: float,
    ) -> None:
        rows = np.arange(problem.n_queries)
        object.__setattr__(self, "assignment", np.asarray(assignment, dtype=np.int64))
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "solver", solver)
        object.__setattr__(self, "solve_seconds", solve_seconds)
        object.__setattr__(self, "total_cost_usd", float(problem.cost[rows, assignment].sum()))
        object.__setattr__(self, "total_quality", float(problem.quality[rows, assignment].sum()))
        object.__setattr__(
            self, "total_preference", float(problem.preference[rows, assignment].sum())
        )

    @property
    def mean_quality(self) -> float:
        return self.total_quality / max(len(self.assignment), 1)

    def objective(self, mode: Mode) -> float:
        """Larger is better: total preference (quality, ties to the cheaper) in budget
        mode, minus total cost in quality mode."""
        return self.total_preference if mode == "budget" else -self.total_cost_usd

    def counts(self, n_models: int) -> NDArray[np.int64]:
        return np.bincount(self.assignment, minlength=n_models)


def solve(
    problem: WindowProblem, method: Method = "exact", time_limit_seconds: float = 2.0
) -> WindowPlan:
    plan = solve_exact(problem, time_limit_seconds) if method == "exact" else solve_fast(problem)
    return keep_single_model(problem, plan)


# A plan's predicted gain over the best affordable single model must exceed this many
# standard errors of that gain. Trained on 100 or 300 RouterBench prompts (ten
# draws, fast solver), the router fell below some single model at that model's
# cost on 9 draws without the check, on 2 with it at 2.5 (at 2: on 1 of the first
# 6); on the whole file (cross-validated) it moved AIQ by +0.0005 (it applies to
# small stores only: predictor.cluster_uncertainty).
GAIN_STANDARD_ERRORS = 2.5


def best_single_model(problem: WindowProblem) -> int | None:
    """The model predicted best on the whole window among those that can take all of
    it: within the budget and its capacity, and allowed for every query (ties: the
    one the tie penalty prefers)."""
    affordable = (
        (problem.cost.sum(axis=0) <= _budget(problem))
        & (problem.capacity_array >= problem.n_queries)
        & problem.permitted.all(axis=0)
    )
    if not affordable.any():
        return None
    mean = np.where(affordable, problem.preference.mean(axis=0), -np.inf)
    return int(_lexargmax(mean[None, :], -problem.cost.sum(axis=0)[None, :])[0])


# An upgrade's least extra cost, for the gain-per-extra-dollar ratios (an upgrade
# that costs no more than the single model is not infinitely good, only very).
MIN_EXTRA_USD = 1e-12


def upgrade_model(problem: WindowProblem, single: int) -> int | None:
    """The model that gains most over `single`, on the window's mean, per extra dollar
    of its mean cost: the next corner of the single models' cost-quality hull.
    None when no model is predicted better on the window."""
    preference, cost = problem.preference.mean(axis=0), problem.cost.mean(axis=0)
    gain = preference - preference[single]
    better = (gain > 0) & (problem.capacity_array >= 1)
    if not better.any():
        return None
    extra = np.maximum(cost - cost[single], MIN_EXTRA_USD)
    return int(np.argmax(np.where(better, gain / extra, -np.inf)))


def single_model_reference(problem: WindowProblem, single: int) -> NDArray[np.int64]:
    """Every query to `single`, the best affordable single model, and the budget it
    leaves spent moving queries to `upgrade_model`, those of most predicted gain
    per extra dollar first: between two models' costs, the single models' frontier.
    The single model alone left a small store's windows spending 30-50% of their
    budget on one mid-priced model (cold-start bench, queries 160-740), and in
    `omnirouter evaluate` trained on 100 prompts kept it above its cost where a
    dearer model would have done better."""
    reference = np.full(problem.n_queries, single, dtype=np.int64)
    upgrade = upgrade_model(problem, single)
    if upgrade is None:
        return reference
    gain = problem.preference[:, upgrade] - problem.preference[:, single]
    extra = problem.cost[:, upgrade] - problem.cost[:, single]
    candidates = np.flatnonzero(problem.permitted[:, upgrade] & (gain > 0))
    order = candidates[
        np.argsort(-gain[candidates] / np.maximum(extra[candidates], MIN_EXTRA_USD), kind="stable")
    ]
    left = _budget(problem) - float(problem.cost[:, single].sum())
    fits = np.cumsum(np.maximum(extra[order], 0.0)) <= left
    capacity = problem.capacity_array[upgrade]
    moved = order[fits][: int(min(capacity, problem.n_queries))]
    reference[moved] = upgrade
    return reference


def gain_standard_error(
    uncertainty: Uncertainty, assignment: NDArray[np.int64], reference: int
) -> float:
    """Standard error of a plan's predicted gain over sending every query to
    `reference`: in each cluster, the queries moved to model j carry the error of
    j's mean there, and all moved queries the error of the reference's mean;
    clusters and models counted as independent of each other."""
    variance = 0.0
    moved = assignment != reference
    for cluster in np.unique(uncertainty.cluster[moved]):
        rows = np.flatnonzero(moved & (uncertainty.cluster == cluster))
        counts = np.bincount(assignment[rows], minlength=uncertainty.variance.shape[1])
        per_model = uncertainty.variance[rows[0]]
        variance += float((counts.astype(float) ** 2 * per_model).sum())
        variance += float(len(rows)) ** 2 * float(per_model[reference])
    return math.sqrt(variance)


def keep_single_model(
    problem: WindowProblem, plan: WindowPlan, standard_errors: float = GAIN_STANDARD_ERRORS
) -> WindowPlan:
    """Budget mode: the best affordable single model for the whole window, what it
    leaves of the budget spent along the single models' frontier
    (`single_model_reference`), unless the plan's predicted gain over that model
    beats `standard_errors` of the gain's uncertainty. With few stored outcomes,
    mixing models on noisy predictions routed worse than the best single model at
    that model's cost (predicted gains that were noise)."""
    if problem.mode != "budget" or problem.uncertainty is None:
        return plan
    single = best_single_model(problem)
    if single is None:
        return plan
    rows = np.arange(problem.n_queries)
    gain = float((problem.quality[rows, plan.assignment] - problem.quality[:, single]).sum())
    threshold = standard_errors * gain_standard_error(problem.uncertainty, plan.assignment, single)
    if gain > threshold or (plan.assignment == single).all():
        return plan
    reference = single_model_reference(problem, single)
    return WindowPlan(problem, reference, plan.status, plan.solver, plan.solve_seconds)


# --------------------------------------------------------------------------- exact


def _pulp_solver(time_limit_seconds: float) -> pulp.LpSolver:
    """HiGHS in-process when highspy is installed, else PuLP's bundled CBC; one
    thread each so the same input gives the same plan."""
    if pulp.HiGHS().available():
        return pulp.HiGHS(msg=False, timeLimit=time_limit_seconds, threads=1, random_seed=0)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_seconds, threads=1)


def _solve_ilp(
    problem: WindowProblem,
    objective: Literal["max_quality", "min_cost"],
    budget_usd: float | None,
    min_total_quality: float | None,
    time_limit_seconds: float,
) -> tuple[NDArray[np.int64] | None, _IlpStatus]:
    """The assignment (None when there is none) and how the solve ended."""
    n, m = problem.quality.shape
    caps = problem.capacity_array
    # Costs are fractions of a cent; scale them near 1 so solver tolerances are relative.
    cost_scale = float(problem.cost.mean()) or 1.0
    cost = problem.cost / cost_scale
    # A forbidden pair has no variable: no plan of the solver's can use it.
    pairs = [(i, j) for i in range(n) for j in range(m) if problem.permitted[i, j]]
    x = {(i, j): pulp.LpVariable(f"x_{i}_{j}", cat=pulp.LpBinary) for i, j in pairs}
    sense = pulp.LpMaximize if objective == "max_quality" else pulp.LpMinimize
    model = pulp.LpProblem("window", sense)
    weights = problem.preference if objective == "max_quality" else cost
    model += pulp.LpAffineExpression((x[p], float(weights[p])) for p in pairs)
    for i in range(n):
        row = [x[i, j] for j in range(m) if (i, j) in x]
        model += pulp.LpAffineExpression((v, 1.0) for v in row) == 1, f"one_{i}"
    for j in range(m):
        if math.isfinite(caps[j]):
            column = [x[i, j] for i in range(n) if (i, j) in x]
            model += pulp.LpAffineExpression((v, 1.0) for v in column) <= caps[j], f"cap_{j}"
    if budget_usd is not None:
        spend = pulp.LpAffineExpression((x[p], float(cost[p])) for p in pairs)
        model += spend <= budget_usd / cost_scale, "budget"
    if min_total_quality is not None:
        gained = pulp.LpAffineExpression((x[p], float(problem.quality[p])) for p in pairs)
        model += gained >= min_total_quality, "target"
    model.solve(_pulp_solver(time_limit_seconds))
    if model.sol_status == pulp.LpSolutionInfeasible:
        return None, "infeasible"
    if model.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, "out_of_time"
    values = np.full((n, m), -1.0)
    for (i, j), v in x.items():
        values[i, j] = v.varValue or 0.0
    ended: _IlpStatus = "optimal" if model.sol_status == pulp.LpSolutionOptimal else "out_of_time"
    return values.argmax(axis=1).astype(np.int64), ended


def solve_exact(problem: WindowProblem, time_limit_seconds: float = 2.0) -> WindowPlan:
    """The ILP, exactly. Out of time: the best plan found, else the fast path's."""
    started = time.perf_counter()
    solver_name = "highs" if pulp.HiGHS().available() else "cbc"
    status: PlanStatus
    if problem.mode == "budget":
        found, ended = _solve_ilp(
            problem, "max_quality", problem.window_budget_usd, None, time_limit_seconds
        )
        status = "optimal" if ended == "optimal" else "time_limited"
        if ended == "infeasible":
            found, ended = _solve_ilp(problem, "min_cost", None, None, time_limit_seconds)
            status = "infeasible_budget_cheapest_plan"
    else:
        found, ended = _solve_ilp(
            problem, "min_cost", None, _target_total(problem), time_limit_seconds
        )
        status = "optimal" if ended == "optimal" else "time_limited"
        if ended == "infeasible":
            found, ended = _solve_ilp(problem, "max_quality", None, None, time_limit_seconds)
            status = "infeasible_target_best_quality_plan"
    if found is None:  # out of time before any plan: the fast path always has one
        fast = solve_fast(problem)
        return WindowPlan(problem, fast.assignment, "time_limited", "lagrangian", _since(started))
    return WindowPlan(problem, found, status, solver_name, _since(started))


# ---------------------------------------------------------------------------- fast


def _assign_within_capacity(
    score: NDArray[np.float64],
    caps: NDArray[np.float64],
    prices: NDArray[np.float64] | None = None,
    rounds: int = 8,
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Maximise sum of score[i, a_i] with at most caps[j] queries on model j.

    Every model has a price (the capacity constraint's multiplier). An
    over-full model's price rises just enough that only caps[j] of its queries
    still prefer it; an under-full model's positive price falls just enough to
    fill it. Prices carry over between calls (warm start), and what is still
    over-full after `rounds` is moved to the next-best model with room.
    A pair scored -inf (forbidden) is never taken. Returns the plan and the prices.
    """
    n, m = score.shape
    prices = np.zeros(m) if prices is None else prices.copy()
    usable = np.flatnonzero(caps > 0)
    if 0 < usable.size < m:
        # A model with no room is no option: left in, it is every query's runner-up
        # while no query may have it, and the prices see no real competition.
        plan, usable_prices = _assign_within_capacity(
            score[:, usable], caps[usable], prices[usable], rounds
        )
        prices[usable] = usable_prices
        return usable[plan].astype(np.int64), prices
    if not np.isfinite(caps).any() or m == 1:
        return score.argmax(axis=1).astype(np.int64), prices
    rows = np.arange(n)
    for _ in range(rounds):
        net = score - prices
        choice = net.argmax(axis=1)
        load = np.bincount(choice, minlength=m)
        over = np.flatnonzero(load > caps)
        idle = np.flatnonzero((load < caps) & (prices > 0))
        if over.size == 0 and idle.size == 0:
            return choice.astype(np.int64), prices
        best = net[rows, choice]
        runner_up = np.partition(net, m - 2, axis=1)[:, m - 2]
        regret = best - runner_up
        for j in over:
            regrets = np.sort(regret[choice == j])[::-1]
            # Infinite: more queries than fit may take only j; the repair decides.
            if math.isfinite(regrets[int(caps[j])]):
                prices[j] += regrets[int(caps[j])] + 1e-12
        for j in idle:
            outsiders = np.sort(best[choice != j] - net[choice != j, j])
            free = int(caps[j] - load[j])
            if outsiders.size:
                prices[j] = max(0.0, prices[j] - outsiders[min(free, outsiders.size) - 1])
    net = score - prices
    repaired = _repair_capacity(net, net.argmax(axis=1).astype(np.int64), caps)
    if (np.bincount(repaired, minlength=m) > caps).any():
        # Moving one query at a time was not enough (only chains of moves fit).
        exact = best_within(score, caps)
        repaired = repaired if exact is None else exact
    return _use_free_capacity(score, repaired, caps), prices


def _repair_capacity(
    score: NDArray[np.float64], choice: NDArray[np.int64], caps: NDArray[np.float64]
) -> NDArray[np.int64]:
    choice = choice.copy()
    m = score.shape[1]
    load = np.bincount(choice, minlength=m).astype(float)
    for j in np.flatnonzero(load > caps):
        members = np.flatnonzero(choice == j)
        # Move the queries that lose least by leaving j.
        alternatives = np.where(load[None, :] < caps[None, :], score[members], -np.inf)
        alternatives[:, j] = -np.inf
        loss = score[members, j] - alternatives.max(axis=1)
        for i in members[np.argsort(loss, kind="stable")]:
            if load[j] <= caps[j]:
                break
            options = np.where(load < caps, score[i], -np.inf)
            options[j] = -np.inf
            target = int(options.argmax())
            if not np.isfinite(options[target]):
                continue  # nowhere else it may go
            choice[i], load[j], load[target] = target, load[j] - 1, load[target] + 1
    return choice


def _use_free_capacity(
    score: NDArray[np.float64], choice: NDArray[np.int64], caps: NDArray[np.float64]
) -> NDArray[np.int64]:
    """Move queries to models with room where that raises their score, largest gain
    first. Prices cannot split queries that tie (identical queries, say): they all
    flip together between two models and can leave one empty that some prefer."""
    choice = choice.copy()
    n, m = score.shape
    rows = np.arange(n)
    for _ in range(m):  # a pass per model at most: a move only ever frees room
        load = np.bincount(choice, minlength=m)
        moved = False
        for j in np.flatnonzero(load < caps):
            gain = score[:, j] - score[rows, choice]
            gainers = np.flatnonzero(gain > 0)
            free = int(min(caps[j] - load[j], gainers.size))
            takers = gainers[np.argsort(-gain[gainers], kind="stable")[:free]]
            if takers.size:
                np.subtract.at(load, choice[takers], 1)
                load[j] += takers.size
                choice[takers] = j
                moved = True
        if not moved:
            break
    return choice


def best_within(
    score: NDArray[np.float64],
    caps: NDArray[np.float64],
    start: NDArray[np.int64] | None = None,
) -> NDArray[np.int64] | None:
    """Exactly: maximise sum score[i, a_i] with at most caps[j] queries on model j,
    never a pair scored -inf; None when no plan fits. `start`: a plan to begin
    from (one that was best before a query left or a capacity shrank: a few steps
    away). On the models' exchange graph (moving query i from model a to b costs
    score[i, a] - score[i, b]): first every chain of moves that gains is made
    (negative cycles, through a model with room), then one query of overflow at a
    time moves along the cheapest chain that ends at a model with room
    (successive shortest paths)."""
    n, m = score.shape
    if n and not np.isfinite(score.max(axis=1)).all():
        return None
    choice = (score.argmax(axis=1) if start is None else start).astype(np.int64)
    if start is not None and not np.isfinite(score[np.arange(n), choice]).all():
        return None
    if start is not None:
        choice = _cancel_gaining_chains(score, choice, caps)
    load = np.bincount(choice, minlength=m).astype(float)
    models = np.arange(m)
    while (load > caps).any():
        weight, mover = _exchange_graph(score, choice, load)
        distance = np.where(load > caps, 0.0, np.inf)
        parent = np.full(m, -1)
        for _ in range(m):  # Bellman-Ford: moves back make negative edges
            through = distance[:, None] + weight
            via = through.argmin(axis=0)
            shorter = through[via, models] < distance - 1e-12
            if not shorter.any():
                break
            distance, parent = (
                np.where(shorter, through[via, models], distance),
                np.where(shorter, via, parent),
            )
        ends = np.flatnonzero((load < caps) & np.isfinite(distance))
        if not ends.size:
            return None
        end = int(ends[distance[ends].argmin()])
        load[end] += 1
        for _ in range(m):
            begin = int(parent[end])
            if begin < 0:
                break
            choice[mover[begin, end]] = end
            end = begin
        load[end] -= 1
    return choice


def _exchange_graph(
    score: NDArray[np.float64], choice: NDArray[np.int64], load: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """weight[a, b]: the least a query on a loses by moving to b (inf: none may);
    mover[a, b]: that query."""
    n, m = score.shape
    loss = score[np.arange(n), choice][:, None] - score  # inf where forbidden
    weight = np.full((m, m), np.inf)
    mover = np.zeros((m, m), dtype=np.int64)
    for a in np.flatnonzero(load > 0):
        members = np.flatnonzero(choice == a)
        cheapest = loss[members].argmin(axis=0)
        weight[a], mover[a] = loss[members[cheapest], np.arange(m)], members[cheapest]
    np.fill_diagonal(weight, np.inf)
    return weight, mover


def _cancel_gaining_chains(
    score: NDArray[np.float64], choice: NDArray[np.int64], caps: NDArray[np.float64]
) -> NDArray[np.int64]:
    """Make every chain of moves that raises the total score: cycles among the
    models, and chains from any model to one with room (through a node `free`,
    m: from it to any model with a query, from a model with room to it)."""
    choice = choice.copy()
    n, m = score.shape
    for _ in range(n * m + 1):
        load = np.bincount(choice, minlength=m).astype(float)
        weight, mover = _exchange_graph(score, choice, load)
        graph = np.full((m + 1, m + 1), np.inf)
        graph[:m, :m] = weight
        graph[:m, m] = np.where(load < caps, 0.0, np.inf)
        graph[m, :m] = np.where(load > 0, 0.0, np.inf)
        distance, parent = np.zeros(m + 1), np.full(m + 1, -1)
        last = -1
        for _ in range(m + 1):
            through = distance[:, None] + graph
            via = through.argmin(axis=0)
            best = through[via, np.arange(m + 1)]
            shorter = best < distance - 1e-12
            if not shorter.any():
                last = -1
                break
            distance, parent = np.where(shorter, best, distance), np.where(shorter, via, parent)
            last = int(np.flatnonzero(shorter)[0])
        if last < 0:
            return choice
        for _ in range(m + 1):  # step back onto the cycle
            last = int(parent[last])
        cycle, node = [last], int(parent[last])
        while node != last:
            cycle.append(node)
            node = int(parent[node])
        # cycle lists the nodes backwards: parent[v] -> v is an edge
        moves = [(int(parent[v]), v) for v in cycle]
        for a, b in moves:
            if a < m and b < m:
                choice[mover[a, b]] = b
    return choice


def _bisect_multiplier(
    caps: NDArray[np.float64],
    feasible: Callable[[NDArray[np.int64]], bool],
    lagrangian: _Lagrangian,
    relative_precision: float = 1e-7,
) -> tuple[NDArray[np.int64], NDArray[np.int64] | None]:
    """Smallest multiplier whose per-query choices satisfy the coupling constraint
    (the Lagrangian dual of that constraint, searched by bisection). Returns the
    plan there and the plan just below it, which misses the constraint narrowly."""
    prices: NDArray[np.float64] | None = None
    low, high = 0.0, 1.0
    plan, prices = _best_assignment(lagrangian(high), caps, prices)
    while not feasible(plan) and high < 1e12:
        low, high = high, high * 4
        plan, prices = _best_assignment(lagrangian(high), caps, prices)
    below, _ = _best_assignment(lagrangian(low), caps)
    if feasible(below):
        return below, None
    # Halving ends at the precision, or where floating point cannot split the
    # interval any more (the multiplier can shrink towards 0 in tied cases).
    while high - low > relative_precision * high:
        middle = (low + high) / 2
        if not low < middle < high:
            break
        candidate, prices = _best_assignment(lagrangian(middle), caps, prices, start=plan)
        if feasible(candidate):
            high, plan = middle, candidate
        else:
            low, below = middle, candidate
    return plan, below


class _Lagrangian:
    """Per-query scores for a multiplier on the coupling constraint."""

    def __init__(self, problem: WindowProblem) -> None:
        scale = float(problem.cost.mean()) or 1.0
        self.quality = problem.quality
        self.preference = problem.preference
        self.cost = problem.cost / scale
        self.mode = problem.mode
        self.masked = problem.masked

    def __call__(self, multiplier: float) -> NDArray[np.float64]:
        if self.mode == "budget":  # maximise preference - lambda c
            return self.masked(self.preference - multiplier * self.cost)
        return self.masked(multiplier * self.quality - self.cost)  # minimise c - lambda q


def _greedy_moves(
    problem: WindowProblem,
    plan: NDArray[np.int64],
    caps: NDArray[np.float64],
    purpose: Literal["repair", "improve"],
) -> list[NDArray[np.int64]]:
    """Move one query at a time to another model with room, best ratio first.

    "repair" makes a plan that misses the coupling constraint meet it (budget
    mode: downgrades losing least quality per dollar saved; quality mode:
    upgrades gaining most quality per dollar). "improve" spends what slack a
    feasible plan has (budget mode: upgrades by quality per dollar that still
    fit; quality mode: downgrades by dollars saved per quality lost that keep
    the target).

    Returns the plan reached. A quality-mode repair also returns the path
    finished early by the cheapest single upgrade that closes the rest of the
    gap (the cheapest such finish over the path's steps): a big upgrade at a
    good ratio can cost far more than a small one that is enough. Budget mode
    keeps the ratio path alone: there the objective is predicted quality, and
    the same finish lost routed accuracy in the cold-start replay
    (docs/history-routing-quality.md).
    """
    plan = plan.copy()
    n, m = problem.quality.shape
    rows = np.arange(n)
    quality, cost = problem.quality, problem.cost
    objective = problem.preference if problem.mode == "budget" else -cost
    load = np.bincount(plan, minlength=m).astype(float)
    budget_mode = problem.mode == "budget"
    weigh_closing = purpose == "repair" and not budget_mode
    path_cost, cheapest_finish = 0.0, (np.inf, plan)
    for _ in range(n * m):
        room = (load < caps)[None, :] & problem.permitted
        d_quality = quality - quality[rows, plan][:, None]
        d_cost = cost - cost[rows, plan][:, None]
        d_objective = objective - objective[rows, plan][:, None]
        if budget_mode:
            slack = _budget(problem) - cost[rows, plan].sum()
        else:
            slack = quality[rows, plan].sum() - _target_total(problem)
        if purpose == "repair":
            if slack >= 0:
                break
            # Gain in the constraint (dollars saved / quality added) per unit of objective lost.
            helps, hurts = (-d_cost, -d_objective) if budget_mode else (d_quality, -d_objective)
            ok = (helps > 0) & room
            ratio = np.where(ok, helps / np.maximum(hurts, 1e-18), -np.inf)
            ratio = np.where(ok & (hurts <= 0), np.inf, ratio)
            if weigh_closing:
                cheapest_finish = min(
                    cheapest_finish,
                    _closing_upgrade(plan, path_cost, ok & (d_quality >= -slack), d_cost),
                    key=lambda finish: finish[0],
                )
        else:
            # Objective gained per unit of slack used.
            gains, uses = (d_objective, d_cost) if budget_mode else (d_objective, -d_quality)
            ok = (gains > 0) & (uses <= slack) & room
            ratio = np.where(ok, gains / np.maximum(uses, 1e-18), -np.inf)
            ratio = np.where(ok & (uses <= 0), np.inf, ratio)
        i, j = divmod(int(np.argmax(ratio)), m)
        if not ok[i, j]:
            break
        path_cost += float(d_cost[i, j])
        load[plan[i]] -= 1
        load[j] += 1
        plan[i] = j
    if np.isfinite(cheapest_finish[0]):
        return [plan, cheapest_finish[1]]
    return [plan]


def _closing_upgrade(
    plan: NDArray[np.int64],
    path_cost: float,
    closes: NDArray[np.bool_],
    d_cost: NDArray[np.float64],
) -> tuple[float, NDArray[np.int64]]:
    """The path so far finished by the cheapest single move that closes the gap:
    its total added cost and its plan (inf: no single move closes it)."""
    added = np.where(closes, d_cost, np.inf)
    i, j = divmod(int(np.argmin(added)), added.shape[1])
    if not np.isfinite(added[i, j]):
        return np.inf, plan
    finished = plan.copy()
    finished[i] = j
    return path_cost + float(added[i, j]), finished


def solve_fast(problem: WindowProblem) -> WindowPlan:
    """Lagrangian dual decomposition with adaptive multipliers; always feasible
    (or the documented fallback), typically within 0.1% of the exact optimum."""
    started = time.perf_counter()
    caps = problem.capacity_array
    feasible = problem.meets_limit
    if problem.mode == "budget":
        cheapest = reference = _best_assignment(problem.masked(-problem.cost), caps)[0]
        if not feasible(cheapest):
            return WindowPlan(
                problem, cheapest, "infeasible_budget_cheapest_plan", "lagrangian", _since(started)
            )
    else:
        best_quality = reference = _best_assignment(problem.masked(problem.quality), caps)[0]
        if not feasible(best_quality):
            best_preferred = _best_assignment(problem.masked(problem.preference), caps)[0]
            return WindowPlan(
                problem,
                best_preferred,
                "infeasible_target_best_quality_plan",
                "lagrangian",
                _since(started),
            )
    above, below = _bisect_multiplier(caps, feasible, _Lagrangian(problem))
    candidates = _greedy_moves(problem, above, caps, "improve")
    if below is not None:
        for repaired in _greedy_moves(problem, below, caps, "repair"):
            if feasible(repaired):
                candidates += _greedy_moves(problem, repaired, caps, "improve")
    # The heuristic's plans may miss the limit under capacities; the reference
    # (the cheapest, or the best quality, plan) keeps it.
    kept = [c for c in candidates if feasible(c)] + [reference]
    plans = [WindowPlan(problem, c, "near_optimal", "lagrangian", 0.0) for c in kept]
    chosen = max(plans, key=lambda plan: plan.objective(problem.mode))
    return WindowPlan(problem, chosen.assignment, "near_optimal", "lagrangian", _since(started))


def within_capacity(
    score: NDArray[np.float64], caps: NDArray[np.float64]
) -> NDArray[np.int64] | None:
    """Exactly the best plan within the capacities (None: none fits), started from
    the Lagrangian heuristic's (a few exchanges away, not a whole solve)."""
    if not np.isfinite(caps).any():
        return None if (score.max(axis=1) == -np.inf).any() else score.argmax(axis=1)
    return best_within(score, caps, start=_assign_within_capacity(score, caps)[0])


def overflow(allowed: NDArray[np.bool_], caps: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per model, the fewest queries beyond its capacity it must take for every query
    to have an allowed model (all zero: the window fits). Each model gets a twin
    without a limit, allowed to the same queries, that costs one per query taken:
    the best plan fills the real slots as far as they go (a maximum matching of
    queries to slots) and puts only the rest on twins."""
    m = allowed.shape[1]
    free = np.where(allowed, 0.0, -np.inf)
    unlimited = np.full(m, np.inf)
    plan = within_capacity(np.hstack([free, free - 1.0]), np.concatenate([caps, unlimited]))
    assert plan is not None  # the twins take any query
    return np.bincount(plan, minlength=2 * m)[m:].astype(float)


def _best_assignment(
    score: NDArray[np.float64],
    caps: NDArray[np.float64],
    prices: NDArray[np.float64] | None = None,
    start: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """The best plan within the capacities, and the heuristic's prices (a warm start
    for the next call): the Lagrangian heuristic's plan, made exact when a capacity
    is finite. The heuristic's cheapest plan had cost up to a third more than the
    cheapest, so a window that could keep its budget was called infeasible; and a
    bisection on its plans, which need not move with the multiplier, ended on plans
    up to 175% dearer than the exact solver's. `start`: the exact plan of a nearby
    multiplier, begun from where the heuristic's plan overflows or scores less
    (with every model tightly capped, exchanges from the heuristic's plan took
    seconds on 2,000 queries)."""
    plan, prices = _assign_within_capacity(score, caps, prices)
    if np.isfinite(caps).any():
        if start is not None and _better_start(score, caps, start, plan):
            plan = start
        exact = best_within(score, caps, start=plan)
        plan = plan if exact is None else exact
    return plan, prices


def _better_start(
    score: NDArray[np.float64],
    caps: NDArray[np.float64],
    start: NDArray[np.int64],
    plan: NDArray[np.int64],
) -> bool:
    """Is `start` (a plan within the capacities) nearer the exact plan than `plan`:
    does `plan` overflow a capacity, or score less?"""
    rows = np.arange(score.shape[0])
    overflows = (np.bincount(plan, minlength=score.shape[1]) > caps).any()
    return bool(overflows or score[rows, start].sum() > score[rows, plan].sum())


def per_query_plan(problem: WindowProblem) -> WindowPlan:
    """The per-query baseline that batch routing must beat: each query alone gets
    an equal share of the budget (or must reach the target on its own)."""
    started = time.perf_counter()
    quality, cost = problem.quality, problem.cost
    cheapest = _lexargmax(problem.masked(-cost), quality)
    best = _lexargmax(problem.masked(problem.preference), -cost)
    if problem.mode == "budget":
        share = _budget(problem) / problem.n_queries
        within = np.where(cost <= share, problem.masked(problem.preference), -np.inf)
        choice = np.where(np.isfinite(within.max(axis=1)), _lexargmax(within, -cost), cheapest)
    else:
        assert problem.quality_target is not None
        good = np.where(quality >= problem.quality_target, problem.masked(-cost), -np.inf)
        choice = np.where(np.isfinite(good.max(axis=1)), _lexargmax(good, quality), best)
    return WindowPlan(
        problem, choice.astype(np.int64), "near_optimal", "per_query", _since(started)
    )


# ------------------------------------------------------------------------- helpers


def _lexargmax(primary: NDArray[np.float64], secondary: NDArray[np.float64]) -> NDArray[np.int64]:
    """Row-wise argmax of `primary`, ties broken by `secondary`."""
    top = primary.max(axis=1, keepdims=True)
    return np.where(primary == top, secondary, -np.inf).argmax(axis=1).astype(np.int64)


def _since(started: float) -> float:
    return time.perf_counter() - started


def _budget(problem: WindowProblem) -> float:
    """The window budget, with the solvers' tolerance."""
    assert problem.window_budget_usd is not None
    return problem.window_budget_usd + FEASIBILITY_TOLERANCE * float(problem.cost.mean())


def _target_total(problem: WindowProblem) -> float:
    """The total quality the target asks for, with the solvers' tolerance."""
    assert problem.quality_target is not None
    return problem.quality_target * problem.n_queries - FEASIBILITY_TOLERANCE
