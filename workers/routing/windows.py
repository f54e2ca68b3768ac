"""One pool's window of predicted queries -> assignments and a window report.

Pure: the router agent gathers the window from Kafka and publishes what this
returns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from numpy.typing import NDArray

from schemas import Assignment, PredictedQuery, WindowReport
from schemas.events import SolverStatus
from workers.config import PoolPolicy
from workers.routing.exploration import ExploredPlan, explore_and_solve
from workers.routing.optimizer import Method, Uncertainty, WindowProblem
from workers.routing.shadow import NOT_SHADOWED

# At most this share of a window's nominal budget repays the pool's overspend: a
# burst of it is repaid over a few windows, and no window starves.
REPAY_SHARE = 0.5


@dataclass(frozen=True)
class WindowBounds:
    window_id: str
    start: datetime
    end: datetime
    # Realised minus predicted spend of the pool's earlier windows not yet taken off a
    # budget (its ledger's `overspend_usd`); a credit (< 0) never adds budget.
    overspend_usd: float = 0.0

    @property
    def seconds(self) -> float:
        return max((self.end - self.start).total_seconds(), 0.0)


def traffic_span(
    created: Sequence[datetime], billed_until: datetime | None, window_length: timedelta
) -> tuple[datetime, datetime]:
    """The stretch of production time a window's queries stand for, which an hourly
    budget is shared by: from where the pool's billing stands (`billed_until`,
    the previous window's end) to this window's last query. Windows of steady
    traffic tile time; a backlog read late (a restart, a lag) brings the budget
    of the time it was produced in, not just the window's. No second is billed
    twice: a window whose queries were all made before `billed_until` (a late
    producer, a replay) gets no new time. With nothing billed close by (the
    start, an idle spell), the window begins one mean gap between its queries
    before its first (at most one window length), and no later than one window
    length before its last: queries made together (a batch job's burst) stand
    for a window's time as a lone query does, not for the ~0 s between them."""
    if billed_until is not None:
        # Queries made before the billed point bring no time, nor stretch the window
        # back over time already billed or a pool's idle spell after it (a lagging
        # producer's query after an idle spell billed the whole spell).
        created = [moment for moment in created if moment > billed_until]
        if not created:
            return billed_until, billed_until
    first, last = min(created), max(created)
    gap = (last - first) / (len(created) - 1) if len(created) > 1 else window_length
    start = min(first - min(gap, window_length), last - window_length)
    if billed_until is not None:
        start = max(start, billed_until)
    return start, max(start, last)


def bounded_created_at(
    created_at: datetime, broker_time: datetime, now: datetime, skew: timedelta
) -> datetime:
    """A producer's `created_at`, kept within `skew` of the broker's timestamp of its
    record and never later than `skew` past the router's own clock: the time a
    query stands for decides its window's hourly budget, so a producer's clock
    (or a forged stamp an hour ahead) must not bring budget of time not yet come."""
    earliest = broker_time - skew
    latest = min(broker_time, now) + skew
    return min(max(created_at, earliest), latest)


def broker_time(timestamp_seconds: float | None, now: datetime) -> datetime:
    """A record's broker timestamp as a datetime; `now` for a record without one
    (None or -1: a message of format version 0) or with one no datetime can hold (a
    producer that gave microseconds for milliseconds: year 58892), which would
    otherwise stop the stage reading it, on every restart."""
    if timestamp_seconds is None or not timestamp_seconds >= 0:
        return now
    try:
        return datetime.fromtimestamp(timestamp_seconds, UTC)
    except (ValueError, OverflowError, OSError):
        return now


def nominal_budget_usd(policy: PoolPolicy, bounds: WindowBounds, queries: int) -> float | None:
    """A fixed budget per window, the hourly budget's share of this window's length,
    or the budget per query times the window's queries (first one set, in that order)."""
    if policy.window_budget_usd is not None:
        return policy.window_budget_usd
    if policy.budget_per_hour_usd is not None:
        return policy.budget_per_hour_usd * bounds.seconds / 3600.0
    if policy.budget_per_query_usd is not None:
        return policy.budget_per_query_usd * queries
    return None


def spend_correction_usd(nominal_usd: float, overspend_usd: float) -> float:
    """What a window of `nominal_usd` gives up to repay the pool's overspend: all of
    it, up to REPAY_SHARE of the window's budget; nothing for a credit (a budget is
    a ceiling: spending less than predicted earns no extra)."""
    return min(max(overspend_usd, 0.0), REPAY_SHARE * max(nominal_usd, 0.0))


def window_budget_usd(policy: PoolPolicy, bounds: WindowBounds, queries: int) -> float | None:
    """The window's budget kept on predicted cost: its nominal budget
    (`nominal_budget_usd`) less what it repays of the pool's realised overspend
    (`spend_correction_usd`); None without a budget."""
    nominal = nominal_budget_usd(policy, bounds, queries)
    if nominal is None:
        return None
    return nominal - spend_correction_usd(nominal, bounds.overspend_usd)


def pool_columns(models: Sequence[str], pool_models: Sequence[str]) -> list[int]:
    """Where each of the pool's models stands among `models` (a prediction's columns)."""
    return [list(models).index(m) for m in pool_models]


def window_rng(window_id: str) -> np.random.Generator:
    """The exploration draws' generator, seeded by the window's id: a window routed
    again (a replay, a restarted router) draws the same."""
    return np.random.default_rng(list(hashlib.sha256(window_id.encode()).digest()[:8]))


def allowed_pairs(
    queries: Sequence[PredictedQuery],
    pool_models: Sequence[str],
    quality: NDArray[np.float64],
    cost: NDArray[np.float64],
) -> NDArray[np.bool_]:
    """Which (query, model) pairs the queries' hints allow. `allowed_models` is
    strict (the router dead-letters a query whose list misses the pool); a
    query's `max_cost_usd` and `min_quality` narrow it further as long as some
    model is left, and are dropped for that query otherwise."""
    allowed = np.ones(quality.shape, dtype=bool)
    for row, predicted in enumerate(queries):
        hints = predicted.query.hints
        if hints is None:
            continue
        if hints.allowed_models is not None:
            allowed[row] = [m in hints.allowed_models for m in pool_models]
        narrowed = allowed[row].copy()
        if hints.max_cost_usd is not None:
            narrowed &= cost[row] <= hints.max_cost_usd
        if hints.min_quality is not None:
            narrowed &= quality[row] >= hints.min_quality
        if narrowed.any():
            allowed[row] = narrowed
    return allowed


# Below this many stored outcomes' worth behind the chosen predictions, on average,
# a window's predictions are the priors and little else: a quality target they
# miss is not judged infeasible, only not judged yet.
UNJUDGED_SUPPORT = 1.0


def honest_status(status: SolverStatus, mean_support: float) -> SolverStatus:
    """The plan's status, saying so when a missed target rests on priors alone."""
    if status == "infeasible_target_best_quality_plan" and mean_support < UNJUDGED_SUPPORT:
        return "unjudged_target_best_quality_plan"
    return status


def support_matrix(
    queries: Sequence[PredictedQuery], columns: Sequence[int]
) -> NDArray[np.float64]:
    """Each prediction's support; none recorded (an older router's event) counts as 0."""
    return np.array(
        [q.support if q.support else [0.0] * len(q.models) for q in queries], dtype=float
    ).reshape(len(queries), -1)[:, columns]


def uncertainty_of(queries: Sequence[PredictedQuery], columns: Sequence[int]) -> Uncertainty | None:
    """The predictor's uncertainty of the window's predictions; None unless every
    query carries it (an empty store, an older router's event)."""
    if not queries or any(q.cluster is None or not q.mean_variance for q in queries):
        return None
    variance = np.array([q.mean_variance for q in queries], dtype=float)[:, columns]
    return Uncertainty(np.array([q.cluster for q in queries], dtype=np.int64), variance)


def model_capacities(
    pool_models: Sequence[str], capacities: Mapping[str, int] | None
) -> tuple[int | None, ...] | None:
    """ROUTER_MODEL_CAPACITIES over the pool's models (None: unlimited), or None when
    none of them is capped."""
    caps = tuple((capacities or {}).get(m) for m in pool_models)
    return None if all(c is None for c in caps) else caps


def fallback_column(pool_models: Sequence[str], fallback_model: str | None) -> int | None:
    """ROUTER_FALLBACK_MODEL's column in the pool's window; None: not one of its models."""
    return pool_models.index(fallback_model) if fallback_model in pool_models else None


def route_window(
    pool: str,
    policy: PoolPolicy,
    queries: Sequence[PredictedQuery],
    models: Sequence[str],
    bounds: WindowBounds,
    capacities: Mapping[str, int] | None = None,
    fallback_model: str | None = None,
    solver: Method = "fast",
    time_limit_seconds: float = 0.25,
    tie_tolerance: float = 0.0,
    exploration_share: float = 0.0,
    exploration_carried_usd: float = 0.0,
    shadow_share: float = 0.0,
) -> tuple[list[Assignment], WindowReport]:
    """Solve the window over the pool's models; every query gets exactly one, among
    the models its hints allow (a hard constraint: WindowProblem.allowed); an `exploration_share` of
    it goes where the router knows least (workers/routing/exploration.py), with
    what the pool's previous window left of its allowance (its report's
    `exploration_carried_usd`); a `shadow_share` of its budget pays for shadow
    answers (workers/routing/shadow.py), each one more assignment of its query."""
    pool_models = list(policy.models or models)
    columns = pool_columns(models, pool_models)
    quality = np.array([q.quality for q in queries], dtype=float)[:, columns]
    cost = np.array([q.cost_usd for q in queries], dtype=float)[:, columns]
    support = support_matrix(queries, columns)
    allowed = allowed_pairs(queries, pool_models, quality, cost)
    budget = window_budget_usd(policy, bounds, len(queries)) if policy.mode == "budget" else None
    nominal = nominal_budget_usd(policy, bounds, len(queries)) if budget is not None else None
    problem = WindowProblem(
        quality,
        cost,
        policy.mode,
        window_budget_usd=budget,
        quality_target=policy.quality_target if policy.mode == "quality" else None,
        capacities=model_capacities(pool_models, capacities),
        fallback_model=fallback_column(pool_models, fallback_model),
        tie_tolerance=tie_tolerance,
        uncertainty=uncertainty_of(queries, columns),
        allowed=allowed,
    )
    explored = explore_and_solve(
        problem,
        support,
        exploration_share,
        window_rng(bounds.window_id),
        solver,
        time_limit_seconds,
        allowed,
        exploration_carried_usd,
        shadow_share,
    )
    plan = explored.plan
    rows = np.arange(len(queries))
    mean_support = float(support[rows, plan.assignment].mean()) if len(queries) else 0.0
    assignments = [
        Assignment(
            query_id=query.query.query_id,
            text=query.query.text,
            model=pool_models[choice],
            pool=pool,
            window_id=bounds.window_id,
            window_start=bounds.start,
            window_end=bounds.end,
            predicted_quality=float(quality[row, choice]),
            predicted_cost_usd=float(cost[row, choice]),
            metadata=query.query.metadata,
            exploration=bool(explored.explored[row]),
        )
        for row, (query, choice) in enumerate(zip(queries, plan.assignment, strict=True))
    ]
    shadows = shadow_assignments(assignments, explored.shadows, pool_models, quality, cost)
    report = WindowReport(
        window_id=bounds.window_id,
        pool=pool,
        window_start=bounds.start,
        window_end=bounds.end,
        query_count=len(queries),
        mode=policy.mode,
        window_budget_usd=budget,
        quality_target=problem.quality_target,
        predicted_spend_usd=plan.total_cost_usd + explored.shadow_spend_usd,
        predicted_mean_quality=plan.mean_quality,
        solver=plan.solver,
        solver_status=honest_status(plan.status, mean_support),
        solve_seconds=plan.solve_seconds,
        assignments_per_model=counts_per_model(pool_models, plan.assignment),
        **exploration_fields(explored, pool_models),
        mean_support=mean_support,
        shadow_queries=len(shadows),
        shadow_spend_usd=explored.shadow_spend_usd,
        spend_correction_usd=0.0 if nominal is None or budget is None else nominal - budget,
    )
    return assignments + shadows, report


def shadow_assignments(
    answers: Sequence[Assignment],
    shadows: NDArray[np.int64] | None,
    models: Sequence[str],
    quality: NDArray[np.float64],
    cost: NDArray[np.float64],
) -> list[Assignment]:
    """One role="shadow" assignment per shadowed query: its answer's copy sent to
    the shadow's model (never delivered: the model worker publishes it final=false)."""
    if shadows is None:
        return []
    return [
        answers[row].model_copy(
            update={
                "model": models[choice],
                "predicted_quality": float(quality[row, choice]),
                "predicted_cost_usd": float(cost[row, choice]),
                "exploration": False,
                "role": "shadow",
            }
        )
        for row, choice in enumerate(shadows)
        if choice != NOT_SHADOWED
    ]


def exploration_fields(explored: ExploredPlan, models: Sequence[str]) -> dict[str, Any]:
    """A window report's exploration figures (a one-shot or a cascade first stage)."""
    return {
        "exploration_queries": int(explored.explored.sum()),
        "exploration_spend_usd": explored.exploration_spend_usd,
        "exploration_per_model": counts_per_model(
            models, explored.plan.assignment[explored.explored]
        ),
        "exploration_carried_usd": explored.next_allowance_usd,
    }


def counts_per_model(models: Sequence[str], assignment: NDArray[np.int64]) -> dict[str, int]:
    counts = np.bincount(assignment, minlength=len(models))
    return {m: int(c) for m, c in zip(models, counts, strict=True) if c}
