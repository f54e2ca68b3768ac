"""A cascade pool's two windows on the stream (pure; workers/stream/cascade_stage.py
gathers them from Kafka and publishes what these return).

First stage (`route_cascade_window`): the window optimiser chooses, per query,
between answering directly with a model (role "answer") and probing with the
panel (one role "probe" assignment per panel model), pricing the probe options
as cascade.price_options does. Each query's cluster under the fitted cascade
comes from the predict stage, which had its vector (`pool_clusters`, carried
with the fit's id on its PredictedQuery); a probe carries it on (and the fit's
id) to the escalation stage, so the query is embedded once, for prediction, and
not again by either stage while the fit stands (`carried_clusters`). A share
of the window is explored as a one-shot window is (workers/routing/exploration.py):
answered directly by models the router knows least, the rest planned again
with what that left (`plan_first_stage` as the planner). Budget
mode: what the window's budget leaves once direct answers and probes are paid
(cascade.escalation_limit) is kept back in the pool's ledger for the escalation
windows: the report's escalation_reserve_usd. Quality mode: the window is
solved for least cost at the pool's target, and each probe carries the mean
quality its escalations must reach for the window to meet it
(`FirstStageLimit.for_escalations`, ProbedQuery.quality_needed).

Escalation stage (`plan_escalation_window`): once a probed query's answers are
in, the answer scorer's posterior says how likely the best probe answer is
good; the same optimiser accepts it (no further cost) or escalates to another
model (role "escalation") under what is left of the pool's reserve, or at least
cost reaching the mean quality its queries need (`escalation_quality_needed`). A query
none of whose probes answered is always escalated (to its cheapest allowed
model when the reserve cannot pay for a better one): every query gets an answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from schemas import (
    Assignment,
    AssignmentRole,
    PredictedQuery,
    ProbeAnswer,
    ProbedQuery,
    WindowReport,
)
from schemas.events import SolverStatus
from workers.config import PoolPolicy
from workers.routing.answer_scorer import ProbeAnswers
from workers.routing.cascade import (
    NEVER,
    CascadePolicy,
    escalation_limit,
    first_stage_problem,
    plan_escalations,
    plan_first_stage,
    price_options,
)
from workers.routing.exploration import explore_and_solve
from workers.routing.optimizer import Method, Mode
from workers.routing.panel_capacity import panel_caps, room_window
from workers.routing.probes import accepted_metadata, probe_metadata
from workers.routing.windows import (
    WindowBounds,
    allowed_pairs,
    counts_per_model,
    exploration_fields,
    fallback_column,
    model_capacities,
    nominal_budget_usd,
    pool_columns,
    support_matrix,
    window_budget_usd,
    window_rng,
)

# Quality and cost of an option a query may not take (its hints forbid a panel model).
FORBIDDEN_QUALITY = -1.0


@dataclass(frozen=True)
class FittedCascade:
    """A pool's fitted cascade, with its models in the order its indices use."""

    policy: CascadePolicy
    models: list[str]  # the pool's models

    @cached_property
    def fit_id(self) -> str:
        """Names this fit's clusters: a cluster carried on an event is this policy's
        only when it names the same clusters. Derived from the centroids, so a
        router restarted on the same outcomes, or another router that fitted the
        same ones, reads the clusters it carries (a refit on more outcomes moves them)."""
        return self.policy.clustering.digest()

    @property
    def panel(self) -> list[str]:
        return [self.models[j] for j in self.policy.panel]


def matrices(
    queries: Sequence[PredictedQuery], models: Sequence[str], pool_models: Sequence[str]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Predicted quality and cost over the pool's models, with what hints allow
    (the optimiser's hard `allowed` mask, as route_window passes it)."""
    columns = pool_columns(models, pool_models)
    quality = np.array([q.quality for q in queries], dtype=float)[:, columns]
    cost = np.array([q.cost_usd for q in queries], dtype=float)[:, columns]
    allowed = allowed_pairs(queries, list(pool_models), quality, cost)
    return quality, cost, allowed


def options_allowed(policy: CascadePolicy, allowed: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Which probe options each query may take, given the models its hints allow
    (`allowed`, per pool model): none if a panel model is forbidden (it would be
    asked), nor one escalating to a forbidden model (its price counts on that
    model's answers, which the escalation stage would never ask for: the first
    stage planned on a quality it could not deliver)."""
    may_probe: NDArray[np.bool_] = np.asarray(allowed[:, policy.panel].all(axis=1), dtype=bool)
    targets = np.array([o.escalate_to for o in policy.options], dtype=np.int64)
    reachable = (targets == NEVER)[None, :] | allowed[:, np.maximum(targets, 0)]
    return np.asarray(may_probe[:, None] & reachable, dtype=np.bool_)


@dataclass(frozen=True)
class WindowLimit:
    """A cascade window's one limit: a budget, USD (budget mode), or a mean quality
    per query (quality mode); read as the window report's two fields."""

    mode: Mode
    value: float

    @property
    def budget_usd(self) -> float | None:
        return self.value if self.mode == "budget" else None

    @property
    def quality_target(self) -> float | None:
        return self.value if self.mode == "quality" else None


@dataclass(frozen=True)
class EscalationLimit(WindowLimit):
    """What an escalation window may use: the pool's reserve, USD, what its first
    stages kept back and escalations have not spent yet (budget mode); or the mean
    quality its queries need (quality mode: `escalation_quality_needed`)."""

    @classmethod
    def reserve(cls, usd: float) -> EscalationLimit:
        return cls("budget", usd)

    @classmethod
    def needed(cls, quality: float) -> EscalationLimit:
        return cls("quality", min(max(quality, 0.0), 1.0))

    def for_the_rest(
        self, forced_quality: NDArray[np.float64], forced_usd: float, queries: int
    ) -> EscalationLimit:
        """What the window's other queries may use once those escalated of necessity
        (no probe answered) are paid (`forced_usd`) and count (`forced_quality`):
        budget mode, the reserve they leave (never below 0); quality mode, the mean
        the others must reach."""
        if self.mode == "budget":
            return EscalationLimit.reserve(max(self.value - forced_usd, 0.0))
        rest = queries - len(forced_quality)
        if rest <= 0:
            return self
        return EscalationLimit.needed((self.value * queries - forced_quality.sum()) / rest)

    def status(self, spent_usd: float, reached: float, solver: Method) -> SolverStatus:
        """Over the reserve (budget mode), or a mean quality `reached` short of the
        need (quality mode): the window could not keep its limit."""
        if self.mode == "budget" and spent_usd > self.value + 1e-9:
            return "infeasible_budget_cheapest_plan"
        if self.mode == "quality" and reached < self.value - 1e-9:
            return "infeasible_target_best_quality_plan"
        return "optimal" if solver == "exact" else "near_optimal"


def route_cascade_window(
    pool: str,
    policy: PoolPolicy,
    cascade: FittedCascade,
    queries: Sequence[PredictedQuery],
    models: Sequence[str],
    clusters: NDArray[np.int64],
    bounds: WindowBounds,
    solver: Method = "fast",
    time_limit_seconds: float = 0.25,
    tie_tolerance: float = 0.0,
    exploration_share: float = 0.0,
    exploration_carried_usd: float = 0.0,
    capacities: Mapping[str, int] | None = None,
    fallback_model: str | None = None,
) -> tuple[list[Assignment], WindowReport]:
    """The first stage of a cascade pool's window: answer and probe assignments, and
    the report with its probe and exploration spend and (budget mode) the reserve
    kept for escalations. `clusters`: the queries' under the fitted cascade
    (`cascade.policy.clusters`). An `exploration_share` of the window is answered
    directly by models the router knows least, as route_window explores (with
    what the pool's previous window left of its allowance); probe options are
    never explored, and the window is planned again around what was. `capacities`
    bound each model's direct answers and, for a panel model, its probes too,
    with `fallback_model` taking what they cannot hold, as in route_window."""
    pool_models = cascade.models
    panel = cascade.policy.panel
    n_models = len(pool_models)
    quality, cost, allowed = matrices(queries, models, pool_models)
    options = price_options(cascade.policy, clusters, quality, cost)
    option_allowed = options_allowed(cascade.policy, allowed)
    limit = FirstStageLimit.of(policy, bounds, len(queries))
    problem = first_stage_problem(
        quality,
        cost,
        options,
        policy.mode,
        limit.value,
        tie_tolerance,
        np.hstack([allowed, option_allowed]),
        model_capacities(pool_models, capacities),
        fallback_column(pool_models, fallback_model),
    )
    support = support_matrix(queries, pool_columns(models, pool_models))
    no_option = np.zeros(options.quality.shape, dtype=bool)
    explored = explore_and_solve(
        problem,
        # A probe option is never explored: its support is never read.
        np.hstack([support, np.zeros(options.quality.shape)]),
        exploration_share,
        window_rng(bounds.window_id),
        allowed=np.hstack([allowed, no_option]),
        carried_usd=exploration_carried_usd,
        planner=lambda window: plan_first_stage(
            window, n_models, solver, time_limit_seconds, panel
        ),
        # With the panel capped, the room must not count on probes beyond its caps.
        room_of=(
            partial(room_window, problem, n_models, panel) if panel_caps(problem, panel) else None
        ),
    )
    plan = explored.plan
    probed = plan.assignment >= n_models
    rows = np.arange(len(queries))
    direct_rows, probe_rows = rows[~probed], rows[probed]
    direct_usd = float(cost[direct_rows, plan.assignment[direct_rows]].sum())
    direct_quality = float(quality[direct_rows, plan.assignment[direct_rows]].sum())
    probe_usd = float(cost[np.ix_(probe_rows, np.asarray(panel, dtype=np.int64))].sum())
    escalations = limit.for_escalations(
        direct_usd + probe_usd, direct_quality, len(queries), len(probe_rows)
    )
    assignments: list[Assignment] = []
    chosen: list[int] = []
    for row, query in enumerate(queries):
        column = int(plan.assignment[row])
        if column < n_models:
            answer = _assignment(
                query, bounds, pool_models[column], quality[row, column], cost[row, column]
            )
            assignments.append(
                answer.model_copy(update={"exploration": bool(explored.explored[row])})
            )
            chosen.append(column)
            continue
        metadata = probe_metadata(
            query.query.metadata,
            query,
            cascade.panel,
            int(clusters[row]),
            cascade.fit_id,
            quality_needed=escalations.quality_target,
        )
        for j in panel:
            probe = _assignment(
                query, bounds, pool_models[j], quality[row, j], cost[row, j], "probe"
            )
            assignments.append(probe.model_copy(update={"metadata": metadata}))
            chosen.append(j)
    report = WindowReport(
        window_id=bounds.window_id,
        pool=pool,
        window_start=bounds.start,
        window_end=bounds.end,
        query_count=len(queries),
        mode=policy.mode,
        window_budget_usd=limit.budget_usd,
        quality_target=limit.quality_target,
        predicted_spend_usd=direct_usd + probe_usd,
        # Each query's expected quality: its model's, or its probe option's.
        predicted_mean_quality=plan.mean_quality,
        solver=plan.solver,
        solver_status=plan.status,
        solve_seconds=plan.solve_seconds,
        assignments_per_model=counts_per_model(pool_models, np.asarray(chosen, dtype=np.int64)),
        **exploration_fields(explored, pool_models),
        probe_queries=len(probe_rows),
        probe_spend_usd=probe_usd,
        escalation_reserve_usd=escalations.budget_usd or 0.0,
        spend_correction_usd=limit.spend_correction_usd,
    )
    return assignments, report


@dataclass(frozen=True)
class FirstStageLimit(WindowLimit):
    """A first-stage window's limit: its budget (budget mode; less what the pool
    repays of its realised overspend, the ledger's, in `bounds`) or the pool's
    quality target, a mean per query (quality mode)."""

    spend_correction_usd: float = 0.0

    @classmethod
    def of(cls, policy: PoolPolicy, bounds: WindowBounds, queries: int) -> FirstStageLimit:
        if policy.mode == "quality":
            return cls("quality", float(policy.quality_target or 0.0))
        budget = window_budget_usd(policy, bounds, queries) or 0.0
        nominal = nominal_budget_usd(policy, bounds, queries) or 0.0
        return cls("budget", budget, nominal - budget)

    def for_escalations(
        self, spent_usd: float, direct_quality: float, queries: int, probed: int
    ) -> EscalationLimit:
        """What the window leaves its probed queries' escalations
        (cascade.escalation_limit): budget mode keeps back what direct answers and
        probes left of the budget, for the pool's reserve; quality mode asks for
        the mean quality that meets the target with the direct answers' (within
        [0, 1]: a target the plan could not reach asks for the most there is)."""
        if not probed:
            return EscalationLimit(self.mode, 0.0)
        left = escalation_limit(self.mode, self.value, spent_usd, direct_quality, queries, probed)
        if self.mode == "budget":
            return EscalationLimit.reserve(left)
        return EscalationLimit.needed(left)


def _assignment(
    query: PredictedQuery,
    bounds: WindowBounds,
    model: str,
    quality: float,
    cost: float,
    role: AssignmentRole = "answer",
) -> Assignment:
    return Assignment(
        query_id=query.query.query_id,
        text=query.query.text,
        model=model,
        pool=query.query.pool,
        window_id=bounds.window_id,
        window_start=bounds.start,
        window_end=bounds.end,
        predicted_quality=quality,
        predicted_cost_usd=cost,
        metadata=query.query.metadata,
        role=role,
    )


def probe_responses(probed: ProbedQuery, panel: Sequence[str]) -> list[str | None]:
    """The panel's answers by name (an error, or a model the query was not probed
    with after the panel changed: None)."""
    by_model = {a.model: a.response for a in probed.answers if not a.error}
    return [by_model.get(m) or None for m in panel]


class CarriesCluster(Protocol):
    """A record that may carry its query's cluster under a fitted cascade: a
    PredictedQuery (from the predict stage) or a ProbedQuery (from the first stage)."""

    @property
    def cascade_cluster(self) -> int | None: ...

    @property
    def cascade_fit(self) -> str | None: ...


def carried_clusters(cascade: FittedCascade, records: Sequence[CarriesCluster]) -> list[int | None]:
    """Each record's cluster under `cascade` as an earlier stage carried it; None where
    it carries none, or one of another fit (the pool was refitted since)."""
    return [r.cascade_cluster if r.cascade_fit == cascade.fit_id else None for r in records]


def pool_clusters(
    cascades: Mapping[str, FittedCascade | None],
    pools: Sequence[str],
    vectors: NDArray[np.float32],
) -> tuple[list[int | None], list[str | None]]:
    """What the predict stage carries for the first stage: each query's cluster under
    its pool's fitted cascade and that fit's id (None for a query of another pool, or
    of a cascade pool not fitted yet); two empty lists when no query has one."""
    clusters: list[int | None] = [None] * len(pools)
    fits: list[str | None] = [None] * len(pools)
    for pool in set(pools):
        fitted = cascades.get(pool)
        if fitted is None:
            continue
        rows = [row for row, p in enumerate(pools) if p == pool]
        for row, cluster in zip(rows, fitted.policy.clusters(vectors[rows]).tolist(), strict=True):
            clusters[row], fits[row] = int(cluster), fitted.fit_id
    if all(fit is None for fit in fits):
        return [], []
    return clusters, fits


def plan_escalation_window(
    pool: str,
    cascade: FittedCascade,
    probed: Sequence[ProbedQuery],
    models: Sequence[str],
    clusters: NDArray[np.int64],
    limit: EscalationLimit,
    bounds: WindowBounds,
    solver: Method = "fast",
    tie_tolerance: float = 0.0,
    capacities: Mapping[str, int] | None = None,
) -> tuple[list[Assignment], WindowReport]:
    """Per probed query one decision: role "probe" (its answer is accepted as the
    final one; `model` says whose) or role "escalation" (a new assignment), within
    `limit` and the models' `capacities` (escalations per model in this window);
    and the escalation window's report. `clusters`: the queries' under the
    fitted cascade (`carried_clusters`, else `cascade.policy.clusters`)."""
    pool_models, panel = cascade.models, cascade.policy.panel
    predicted = [p.predicted for p in probed]
    quality, cost, allowed = matrices(predicted, models, pool_models)
    responses = [probe_responses(p, cascade.panel) for p in probed]
    # A probe answer from a model the query's hints forbid is no answer it may be given.
    answered = np.array([[r is not None for r in row] for row in responses], dtype=bool)
    answered &= allowed[:, panel]
    posterior = cascade.policy.scorer.posterior(ProbeAnswers.of(responses), quality, clusters)
    # A probe without an answer can never be accepted; a forbidden model never chosen.
    posterior[:, panel] = np.where(answered, posterior[:, panel], 0.0)
    posterior = np.where(allowed, posterior, FORBIDDEN_QUALITY)
    accept = np.where(
        answered.any(axis=1), cascade.policy.accept_quality(posterior), FORBIDDEN_QUALITY
    )
    # P(good) of each escalation: the scorer's; a panel model asked again (no probe
    # answered, and the hints allow nothing else) has no answer in hand to score,
    # so its one-shot prediction.
    escalated = posterior.copy()
    escalated[:, panel] = np.where(allowed[:, panel], quality[:, panel], FORBIDDEN_QUALITY)
    asked = asked_models(probed, pool_models)
    asked[:, panel] = True
    choice = _escalation_choice(
        escalated, accept, cost, allowed, answered, asked, panel, limit, solver, tie_tolerance,
        model_capacities(pool_models, capacities),
    )  # fmt: skip
    accepted = np.asarray(panel)[np.where(answered, posterior[:, panel], -np.inf).argmax(axis=1)]
    decisions: list[Assignment] = []
    spend, chosen_quality = 0.0, []
    for row, query in enumerate(predicted):
        j = int(choice[row])
        if j == NEVER:
            k = int(accepted[row])
            decision = _assignment(query, bounds, pool_models[k], float(accept[row]), 0.0, "probe")
            answer = responses[row][cascade.policy.panel.index(k)]
            metadata = accepted_metadata(query.query.metadata, answer)
            decisions.append(decision.model_copy(update={"metadata": metadata}))
            chosen_quality.append(float(accept[row]))
            continue
        decisions.append(
            _assignment(
                query, bounds, pool_models[j], float(escalated[row, j]), cost[row, j], "escalation"
            )
        )
        spend += float(cost[row, j])
        chosen_quality.append(float(escalated[row, j]))
    reached = float(np.mean(chosen_quality)) if chosen_quality else 0.0
    report = escalation_report(
        pool, bounds, decisions, pool_models, limit, chosen_quality, solver,
        limit.status(spend, reached, solver),
    )  # fmt: skip
    return decisions, report


def _escalation_choice(
    escalated: NDArray[np.float64],
    accept: NDArray[np.float64],
    cost: NDArray[np.float64],
    allowed: NDArray[np.bool_],
    answered: NDArray[np.bool_],
    asked: NDArray[np.bool_],
    panel: Sequence[int],
    limit: EscalationLimit,
    solver: Method,
    tie_tolerance: float,
    capacities: tuple[int | None, ...] | None = None,
) -> NDArray[np.int64]:
    """Per query NEVER (accept) or the model it is escalated to (P(good)
    `escalated`). A query none of whose probes answered is escalated whatever the
    plan (`forced_escalation`), first: it takes its slot of `capacities`, its cost
    comes out of the reserve (budget mode; beyond it if need be) or its forced
    model's quality counts towards the need (quality mode: an answer it cannot be
    given must not count as a quality of FORBIDDEN_QUALITY, which the others
    would have to make up). The other queries are then planned with what is left."""
    unanswered: NDArray[np.bool_] = np.asarray(~answered.any(axis=1), dtype=bool)
    choice = np.full(len(escalated), NEVER, dtype=np.int64)
    forced = forced_escalation(cost[unanswered], allowed[unanswered], asked[unanswered], capacities)
    choice[unanswered] = forced
    rest = limit.for_the_rest(
        np.maximum(escalated[unanswered, forced], 0.0),
        float(cost[unanswered, forced].sum()),
        len(choice),
    )
    solved = np.flatnonzero(~unanswered)
    if len(solved):
        # A model the query was probed with already (by an earlier fit's panel) is no
        # escalation: its answer was asked for, and paid, once.
        may_escalate = allowed[solved] & ~asked[solved]
        choice[solved] = plan_escalations(
            escalated[solved], accept[solved], cost[solved], panel, rest.mode, rest.value,
            solver, tie_tolerance, may_escalate, slots_left(capacities, forced),
        )  # fmt: skip
    return choice


def slots_left(
    capacities: tuple[int | None, ...] | None, taken: NDArray[np.int64]
) -> tuple[int | None, ...] | None:
    """What `capacities` leave once the models in `taken` have one query each."""
    if capacities is None:
        return None
    load = np.bincount(taken, minlength=len(capacities))
    return tuple(None if c is None else max(c - int(load[j]), 0) for j, c in enumerate(capacities))


def escalation_quality_needed(probed: Sequence[ProbedQuery], target: float) -> float:
    """The mean quality an escalation window of a quality-mode pool must reach: its
    queries' `quality_needed` (each as its first-stage window asked), the pool's
    `target` for a query that carries none (probed by an older router, or while
    the pool was in budget mode)."""
    needed = [target if p.quality_needed is None else p.quality_needed for p in probed]
    return float(np.mean(needed)) if needed else target


def asked_models(probed: Sequence[ProbedQuery], pool_models: Sequence[str]) -> NDArray[np.bool_]:
    """Which of the pool's models each query was probed with (answered or not)."""
    names = [{a.model for a in item.answers} for item in probed]
    asked = np.array([[m in n for m in pool_models] for n in names], dtype=bool)
    return asked.reshape(len(probed), len(pool_models))


def forced_escalation(
    cost: NDArray[np.float64],
    allowed: NDArray[np.bool_],
    asked: NDArray[np.bool_],
    capacities: tuple[int | None, ...] | None = None,
) -> NDArray[np.int64]:
    """Per query, where it goes when it must be escalated (none of its probes
    answered): its cheapest allowed model not `asked` yet; when its hints allow
    only models asked already, the cheapest of those, asked again. With
    `capacities` each query takes a slot, the queries with the fewest allowed
    models first: its cheapest model not asked yet with a slot left, else its
    cheapest allowed one with a slot left (asked again), else (none has one) its
    cheapest model not asked yet anyway: a query must be answered, as hints
    outrank capacities in any window. Never a model its hints forbid (a query
    allowing no pool model at all is dead-lettered before it gets here; such a
    row would get its cheapest model)."""
    fresh = allowed & ~asked
    candidates = np.where(fresh.any(axis=1, keepdims=True), fresh, allowed)
    candidates |= ~candidates.any(axis=1, keepdims=True)
    price = np.where(candidates, cost, np.inf)
    if capacities is None:
        return np.asarray(price.argmin(axis=1), dtype=np.int64)
    again = np.where(allowed, cost, np.inf)
    slots = np.array([np.inf if c is None else float(c) for c in capacities])
    chosen = np.empty(len(price), dtype=np.int64)
    for row in np.argsort(allowed.sum(axis=1), kind="stable"):
        for prices in (price[row], again[row]):
            with_room = np.where(slots >= 1, prices, np.inf)
            if np.isfinite(with_room).any():
                chosen[row] = int(with_room.argmin())
                break
        else:
            chosen[row] = int(price[row].argmin())
        slots[chosen[row]] -= 1
    return chosen


def escalation_report(
    pool: str,
    bounds: WindowBounds,
    decisions: Sequence[Assignment],
    pool_models: Sequence[str],
    limit: EscalationLimit | None,
    chosen_quality: Sequence[float],
    solver: str,
    status: SolverStatus,
    mode: Mode = "budget",
) -> WindowReport:
    """An escalation window's report: its spend is the escalations'; its limit the
    reserve (budget mode) or the mean quality needed (quality mode); None: decided
    without a plan (`accept_without_scorer`), in the pool's `mode`."""
    escalations = [d for d in decisions if d.role == "escalation"]
    spend = float(sum(d.predicted_cost_usd for d in escalations))
    models = list(pool_models)
    chosen = np.asarray([models.index(d.model) for d in escalations], dtype=np.int64)
    return WindowReport(
        window_id=bounds.window_id,
        pool=pool,
        window_start=bounds.start,
        window_end=bounds.end,
        query_count=len(decisions),
        mode=mode if limit is None else limit.mode,
        window_budget_usd=None if limit is None else limit.budget_usd,
        quality_target=None if limit is None else limit.quality_target,
        predicted_spend_usd=spend,
        predicted_mean_quality=float(np.mean(chosen_quality)) if len(chosen_quality) else 0.0,
        solver=solver,
        solver_status=status,
        solve_seconds=0.0,
        assignments_per_model=counts_per_model(models, chosen),
        escalation_queries=len(escalations),
        escalation_spend_usd=spend,
    )


def accept_without_scorer(
    pool: str,
    probed: Sequence[ProbedQuery],
    models: Sequence[str],
    pool_models: Sequence[str],
    bounds: WindowBounds,
    mode: Mode = "budget",
    capacities: Mapping[str, int] | None = None,
) -> tuple[list[Assignment], WindowReport]:
    """Decisions when the pool has no fitted cascade any more (its probes were sent
    by an earlier fit, or another router): accept the first probe answer of a model
    the query's hints allow; a query with none is escalated (`forced_escalation`,
    within `capacities` where it can). `mode`: the pool's, for the report."""
    predicted = [p.predicted for p in probed]
    quality, cost, allowed = matrices(predicted, models, pool_models)
    accepted: list[ProbeAnswer | None] = []
    for row, item in enumerate(probed):
        may_answer = {m for m, ok in zip(pool_models, allowed[row], strict=True) if ok}
        accepted.append(
            next(
                (a for a in item.answers if a.response and not a.error and a.model in may_answer),
                None,
            )
        )
    unanswered = np.array([a is None for a in accepted], dtype=bool)
    forced = np.full(len(probed), NEVER, dtype=np.int64)
    forced[unanswered] = forced_escalation(
        cost[unanswered],
        allowed[unanswered],
        asked_models(probed, pool_models)[unanswered],
        model_capacities(pool_models, capacities),
    )
    decisions: list[Assignment] = []
    for row, (query, answer) in enumerate(zip(predicted, accepted, strict=True)):
        if answer is not None:
            metadata = accepted_metadata(query.query.metadata, answer.response)
            decision = _assignment(query, bounds, answer.model, 0.0, 0.0, "probe")
            decisions.append(decision.model_copy(update={"metadata": metadata}))
            continue
        j = int(forced[row])
        decisions.append(
            _assignment(query, bounds, pool_models[j], quality[row, j], cost[row, j], "escalation")
        )
    report = escalation_report(
        pool, bounds, decisions, pool_models, None, [], "none", "near_optimal", mode
    )
    return decisions, report
