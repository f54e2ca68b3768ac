"""A cascade pool's two stream windows (workers/routing/cascade_window.py) and the
pool ledger between them (workers/stream/pool_ledger.py): the first stage keeps
what its budget leaves as the escalation reserve, escalations spend within the
reserve, and the spend across both stages stays within the window's budget; on
the stream (workers/stream/cascade_stage.py), a query's cluster travels with it
from the predict stage to the first stage and on to the escalation stage, so
neither stage embeds it again."""

from __future__ import annotations

import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
from numpy.typing import NDArray

from schemas import (
    Assignment,
    ModelResponse,
    PredictedBatch,
    PredictedQuery,
    ProbeAnswer,
    ProbedQuery,
    QueryEvent,
    QueryHints,
    WindowReport,
)
from tests.unit.test_cascade import COSTS, recorded, unit_vectors
from workers.config import PoolPolicy, Settings
from workers.routing.cascade import NEVER, fit_cascade
from workers.routing.cascade_window import (
    EscalationLimit,
    FirstStageLimit,
    FittedCascade,
    accept_without_scorer,
    escalation_quality_needed,
    plan_escalation_window,
    pool_clusters,
    route_cascade_window,
)
from workers.routing.optimizer import WindowProblem, solve
from workers.routing.probes import (
    CASCADE_METADATA_KEY,
    PendingProbes,
    add_answer,
    is_complete,
    probed_query,
)
from workers.routing.windows import WindowBounds
from workers.stream.cascade_stage import CascadeRouting, cascade_clusters, decide, read_probed
from workers.stream.codec import BadEvent, encode
from workers.stream.pool_ledger import PoolAccount, after_escalations, after_window
from workers.stream.router_state import RouterState
from workers.stream.window_stage import WindowStage

MODELS = ["cheap-a", "cheap-b", "dear"]
PANEL = ["cheap-a", "cheap-b"]
NOW = datetime(2026, 11, 30, tzinfo=UTC)
BOUNDS = WindowBounds("w", NOW, NOW + timedelta(seconds=1))


@pytest.fixture(scope="module")
def cascade() -> FittedCascade:
    n = 400
    responses, truth, costs = recorded(n, seed=1)
    predicted = np.tile([0.7, 0.7, 0.95], (n, 1))
    ids = [f"q{i}" for i in range(n)]
    policy = fit_cascade(ids, unit_vectors(n, 1), responses, predicted, truth, costs)
    return FittedCascade(policy, MODELS)


def clusters_of(cascade: FittedCascade, n: int, seed: int) -> NDArray[np.int64]:
    """Clusters of `n` random queries under the fitted cascade."""
    return cascade.policy.clusters(unit_vectors(n, seed))


def predicted(n: int, hints: QueryHints | None = None) -> list[PredictedQuery]:
    return [
        PredictedQuery(
            query=QueryEvent(query_id=f"q{i}", text=f"question {i}", pool="c", hints=hints),
            models=MODELS,
            quality=[0.7, 0.7, 0.95],
            cost_usd=COSTS.tolist(),
        )
        for i in range(n)
    ]


def policy(per_query: float) -> PoolPolicy:
    return PoolPolicy(mode="budget", budget_per_query_usd=per_query, cascade=True)


def probed(queries: list[PredictedQuery], answers: list[list[str | None]]) -> list[ProbedQuery]:
    return [
        ProbedQuery(
            predicted=q,
            answers=[ProbeAnswer(model=m, response=r) for m, r in zip(PANEL, a, strict=True)],
        )
        for q, a in zip(queries, answers, strict=True)
    ]


@pytest.mark.parametrize("per_query", [3.0, 6.0, 12.0])
def test_spend_across_both_stages_keeps_the_window_budget(
    cascade: FittedCascade, per_query: float
) -> None:
    n = 60
    queries = predicted(n)
    clusters = clusters_of(cascade, n, 2)
    assignments, first = route_cascade_window(
        "c", policy(per_query), cascade, queries, MODELS, clusters, BOUNDS
    )
    budget = per_query * n
    assert first.window_budget_usd == budget
    probes = [a for a in assignments if a.role == "probe"]
    assert len(probes) == 2 * first.probe_queries
    assert first.probe_spend_usd == pytest.approx(first.probe_queries * (COSTS[0] + COSTS[1]))
    assert first.predicted_spend_usd <= budget + 1e-9
    if first.probe_queries:
        # What the budget leaves once direct answers and probes are paid is kept back.
        assert first.predicted_spend_usd + first.escalation_reserve_usd == pytest.approx(budget)
        assert all(CASCADE_METADATA_KEY in p.metadata for p in probes)
    account = after_window(PoolAccount(escalation_reserve_usd=0.5), first)
    assert account.escalation_reserve_usd == pytest.approx(0.5 + first.escalation_reserve_usd)
    assert account.billed_until == BOUNDS.end

    probed_ids = {p.query_id for p in probes}
    asked = [q for q in queries if q.query.query_id in probed_ids]
    rng = np.random.default_rng(3)
    answers = [[str(rng.choice(["x", "y"])), str(rng.choice(["x", "y"]))] for _ in asked]
    decisions, second = plan_escalation_window(
        "c", cascade, probed(asked, answers), MODELS, clusters_of(cascade, len(asked), 4),
        EscalationLimit.reserve(account.escalation_reserve_usd), BOUNDS,
    )  # fmt: skip
    assert len(decisions) == len(asked)
    assert second.escalation_spend_usd <= account.escalation_reserve_usd + 1e-9
    assert second.escalation_queries == sum(d.role == "escalation" for d in decisions)
    after = after_escalations(account, second)
    assert after.billed_until == account.billed_until
    assert after.escalation_reserve_usd == pytest.approx(
        account.escalation_reserve_usd - second.escalation_spend_usd
    )
    spent = first.predicted_spend_usd + second.escalation_spend_usd
    assert spent <= budget + 0.5 + 1e-9


def test_a_first_stage_repays_the_pools_overspend_and_keeps_its_reserve_within(
    cascade: FittedCascade,
) -> None:
    n, per_query = 60, 6.0
    overspend = WindowBounds("w", BOUNDS.start, BOUNDS.end, overspend_usd=50.0)
    _, first = route_cascade_window(
        "c", policy(per_query), cascade, predicted(n), MODELS, clusters_of(cascade, n, 2),
        overspend,
    )  # fmt: skip
    assert first.spend_correction_usd == pytest.approx(50.0)
    assert first.window_budget_usd == pytest.approx(per_query * n - 50.0)
    kept = first.predicted_spend_usd + first.escalation_reserve_usd
    assert kept <= per_query * n - 50.0 + 1e-9


def explored_window(
    cascade: FittedCascade, pool: PoolPolicy, share: float, carried_usd: float = 0.0
) -> tuple[list[Assignment], WindowReport]:
    """A first-stage window of 60 queries the router knows nothing about (support 0)."""
    return route_cascade_window(
        "c", pool, cascade, predicted(60), MODELS, clusters_of(cascade, 60, 2), BOUNDS,
        exploration_share=share, exploration_carried_usd=carried_usd,
    )  # fmt: skip


def test_a_cascade_window_explores_direct_answers_within_its_budget(
    cascade: FittedCascade,
) -> None:
    """Exploration answers a share of the window directly with models the router knows
    least, marked so, never a probe; its spend is the allowance's (what is left is
    carried to the next window) and counts, with direct answers and probes, against
    the budget that leaves the escalation reserve (before: a cascade pool never
    explored)."""
    budget, share = 6.0 * 60, 0.1
    assignments, report = explored_window(cascade, policy(6.0), share)
    explored = [a for a in assignments if a.exploration]
    assert report.exploration_queries == len(explored) > 0
    assert {a.role for a in explored} == {"answer"}
    assert report.exploration_per_model == dict(Counter(a.model for a in explored))
    assert report.exploration_spend_usd == pytest.approx(
        sum(a.predicted_cost_usd for a in explored)
    )
    assert report.exploration_spend_usd <= share * budget + 1e-9
    assert report.exploration_carried_usd == pytest.approx(
        share * budget - report.exploration_spend_usd
    )
    direct = [a for a in assignments if a.role == "answer"]
    probes = [a for a in assignments if a.role == "probe"]
    assert len({a.query_id for a in direct}) + report.probe_queries == 60
    assert report.probe_queries > 0
    spent = sum(a.predicted_cost_usd for a in direct + probes)
    assert report.predicted_spend_usd == pytest.approx(spent)
    assert report.predicted_spend_usd + report.escalation_reserve_usd == pytest.approx(budget)
    # The window's id seeds the draws: the same window explores the same queries.
    again, _ = explored_window(cascade, policy(6.0), share)
    assert [a.exploration for a in again] == [a.exploration for a in assignments]


def test_a_cascade_window_s_unused_allowance_is_carried_and_spent_later(
    cascade: FittedCascade,
) -> None:
    """An allowance too small for any model (1% of $90, below the cheapest $1) is
    carried whole; with enough carried, a later window explores: over time the
    allowance spent is the share, and a dear model can be tried too."""
    _, first = explored_window(cascade, policy(1.5), 0.01)
    assert first.exploration_queries == 0
    assert first.exploration_carried_usd == pytest.approx(0.01 * 90)
    _, later = explored_window(cascade, policy(1.5), 1 / 60, carried_usd=40.0)
    assert later.exploration_queries == 1  # 1/60 of 60 queries
    # What it may spend: the share and what was carried, up to the dearest answer it
    # may explore ($20; not a probe option's price, which can be dearer): what it
    # does not spend of that is carried on.
    allowance = later.exploration_spend_usd + later.exploration_carried_usd
    assert later.exploration_spend_usd > 0 and allowance == pytest.approx(20.0)
    assert later.predicted_spend_usd <= 90.0 + 1e-9


def test_a_quality_cascade_window_explores_only_what_its_target_can_spare(
    cascade: FittedCascade,
) -> None:
    """Quality mode: exploration gives up no more quality than the window can spare,
    so the first stage's plan still meets the pool's target on predictions."""
    assignments, report = explored_window(cascade, quality_policy(0.8), 0.1)
    assert report.exploration_queries == sum(a.exploration for a in assignments) > 0
    assert report.predicted_mean_quality >= 0.8 - 1e-9
    assert report.solver_status in ("optimal", "near_optimal")


def test_agreeing_probes_are_accepted_and_disagreeing_ones_escalated(
    cascade: FittedCascade,
) -> None:
    queries = predicted(20)
    answers = [["x", "x"] if i < 10 else ["x", "y"] for i in range(20)]
    decisions, report = plan_escalation_window(
        "c",
        cascade,
        probed(queries, answers),
        MODELS,
        clusters_of(cascade, 20, 5),
        EscalationLimit.reserve(10 * COSTS[2]),
        BOUNDS,
    )
    roles = [d.role for d in decisions]
    assert roles[:10] == ["probe"] * 10  # accepted: their answer is final
    assert roles[10:] == ["escalation"] * 10
    assert {d.model for d in decisions[10:]} == {"dear"}
    assert report.escalation_spend_usd == pytest.approx(10 * COSTS[2])
    accepted = decisions[0].metadata[CASCADE_METADATA_KEY]
    assert accepted == {"response": "x"}


@pytest.mark.parametrize("mode", ["budget", "quality"])
def test_a_capped_model_answers_directly_within_its_cap(cascade: FittedCascade, mode: str) -> None:
    """ROUTER_MODEL_CAPACITIES on the dear model (outside the panel): the first stage
    gives it at most its cap of direct answers, and the fallback model takes what
    the caps cannot hold (before: a cascade pool refused any capped model)."""
    pool = policy(30.0) if mode == "budget" else quality_policy(0.93)
    n, clusters = 60, clusters_of(cascade, 60, 2)

    def per_model(capacities: dict[str, int] | None) -> dict[str, int]:
        assignments, report = route_cascade_window(
            "c", pool, cascade, predicted(n), MODELS, clusters, BOUNDS,
            capacities=capacities, fallback_model="cheap-a",
        )  # fmt: skip
        assert len({a.query_id for a in assignments}) == n
        assert report.assignments_per_model == dict(Counter(a.model for a in assignments))
        return report.assignments_per_model

    assert per_model(None)["dear"] > 5  # the cap below binds
    assert per_model({"dear": 5})["dear"] <= 5
    # Every model capped, too few slots for the window: the fallback takes the rest.
    every = per_model({"dear": 5, "cheap-b": 5, "cheap-a": 5})
    assert every.get("dear", 0) <= 5 and every.get("cheap-b", 0) <= 5
    assert every["cheap-a"] > 5


def test_a_capped_panel_model_takes_its_probes_and_direct_answers_within_its_cap(
    cascade: FittedCascade,
) -> None:
    """A probe takes a slot of every panel model: "cheap-a" capped at 10 a window has
    at most 10 assignments, probes and direct answers together, and the window
    still probes."""
    n, clusters = 60, clusters_of(cascade, 60, 2)

    def window(capacities: dict[str, int] | None) -> WindowReport:
        _, report = route_cascade_window(
            "c", policy(6.0), cascade, predicted(n), MODELS, clusters, BOUNDS,
            capacities=capacities, fallback_model="dear",
        )  # fmt: skip
        return report

    assert window(None).assignments_per_model["cheap-a"] > 10  # the cap below binds
    capped = window({"cheap-a": 10})
    assert 0 < capped.probe_queries <= capped.assignments_per_model["cheap-a"] <= 10
    assert capped.predicted_spend_usd <= 6.0 * n + 1e-9


def test_an_escalation_window_escalates_to_a_capped_model_within_its_cap(
    cascade: FittedCascade,
) -> None:
    """Ten disagreeing answers all worth escalating to "dear", capped at 3 a window:
    3 are escalated, the rest accept their best probe answer."""
    queries = predicted(10)
    decisions, report = plan_escalation_window(
        "c", cascade, probed(queries, [["x", "y"]] * 10), MODELS,
        clusters_of(cascade, 10, 5), EscalationLimit.reserve(10 * COSTS[2]), BOUNDS,
        capacities={"dear": 3},
    )  # fmt: skip
    roles = Counter(d.role for d in decisions)
    assert roles == Counter({"escalation": 3, "probe": 7})
    assert report.escalation_queries == 3


def test_a_query_no_probe_answered_takes_no_slot_the_plan_could_use(
    cascade: FittedCascade,
) -> None:
    """Budget mode, "dear" capped at 2: a query no probe answered is escalated by the
    plan, and four disagreeing ones compete for the other slot. The plan's own
    escalation of it used to be counted twice (its forced slot kept back besides),
    leaving one slot unused."""
    queries = predicted(5)
    decisions, _ = plan_escalation_window(
        "c", cascade, probed(queries, [[None, None]] + [["x", "y"]] * 4), MODELS,
        clusters_of(cascade, 5, 5), EscalationLimit.reserve(100 * COSTS[2]), BOUNDS,
        capacities={"dear": 2},
    )  # fmt: skip
    assert (decisions[0].role, decisions[0].model) == ("escalation", "dear")
    assert sum(d.role == "escalation" and d.model == "dear" for d in decisions) == 2


def test_a_query_without_any_probe_answer_is_escalated_even_beyond_the_reserve(
    cascade: FittedCascade,
) -> None:
    queries = predicted(3)
    decisions, report = plan_escalation_window(
        "c", cascade, probed(queries, [[None, None], ["x", "x"], [None, "x"]]), MODELS,
        clusters_of(cascade, 3, 6), EscalationLimit.reserve(0.0), BOUNDS,
    )  # fmt: skip
    assert [d.role for d in decisions] == ["escalation", "probe", "probe"]
    assert decisions[2].model == "cheap-b"  # the only probe that answered
    assert report.solver_status == "infeasible_budget_cheapest_plan"
    after = after_escalations(PoolAccount(escalation_reserve_usd=0.0), report)
    assert after.escalation_reserve_usd == 0.0


@pytest.mark.parametrize("reserve", [0.0, 1000.0])
def test_a_query_without_probe_answers_is_escalated_only_to_a_model_its_hints_allow(
    cascade: FittedCascade, reserve: float
) -> None:
    # The hints allow the panel only: the query is asked again of its cheapest
    # panel model (an escalation), never sent to "dear", whatever the reserve.
    queries = predicted(2, QueryHints(allowed_models=PANEL))
    queries += predicted(1, QueryHints(allowed_models=["cheap-b", "cheap-a", "dear"]))
    decisions, report = plan_escalation_window(
        "c", cascade, probed(queries, [[None, None]] * 3), MODELS,
        clusters_of(cascade, 3, 5), EscalationLimit.reserve(reserve), BOUNDS,
    )  # fmt: skip
    assert [(d.role, d.model) for d in decisions] == [
        ("escalation", "cheap-a"),
        ("escalation", "cheap-a"),
        ("escalation", "dear"),  # a model outside the panel, when one is allowed
    ]
    assert report.escalation_spend_usd == pytest.approx(2 * COSTS[0] + COSTS[2])


@pytest.mark.parametrize("reserve", [0.0, 1000.0])
def test_a_probe_answer_of_a_model_the_hints_forbid_is_never_delivered(
    cascade: FittedCascade, reserve: float
) -> None:
    # Only cheap-b answered, and the query's hints forbid it (a record probed
    # before its hints were read, say): the query has no answer it may be given,
    # so it is escalated to a model it allows, even beyond the reserve.
    queries = predicted(1, QueryHints(allowed_models=["cheap-a", "dear"]))
    decisions, report = plan_escalation_window(
        "c", cascade, probed(queries, [[None, "x"]]), MODELS, clusters_of(cascade, 1, 8),
        EscalationLimit.reserve(reserve), BOUNDS,
    )  # fmt: skip
    assert [(d.role, d.model) for d in decisions] == [("escalation", "dear")]
    assert report.escalation_spend_usd == pytest.approx(COSTS[2])


def test_a_forced_escalation_does_not_ask_again_a_model_that_failed_already(
    cascade: FittedCascade,
) -> None:
    # Probed by another fit's panel, whose "dear" failed; every model outside the
    # current panel has been asked: the cheapest allowed model is, not "dear" again.
    item = ProbedQuery(
        predicted=predicted(1)[0],
        answers=[ProbeAnswer(model="dear", response=None, error="timeout")],
    )
    decisions, _ = plan_escalation_window(
        "c", cascade, [item], MODELS, clusters_of(cascade, 1, 5), EscalationLimit.reserve(0.0),
        BOUNDS,
    )  # fmt: skip
    assert [(d.role, d.model) for d in decisions] == [("escalation", "cheap-a")]


def test_a_model_an_earlier_panel_asked_is_not_asked_again(cascade: FittedCascade) -> None:
    """Probed by an earlier fit's panel [cheap-a, dear], whose answers disagree; the
    pool refitted since to [cheap-a, cheap-b]. With reserve to spare, every query
    was escalated to "dear": its answer asked for, and paid, twice."""
    queries = predicted(10)
    items = [
        ProbedQuery(
            predicted=q,
            answers=[
                ProbeAnswer(model="cheap-a", response="x"),
                ProbeAnswer(model="dear", response="y"),
            ],
        )
        for q in queries
    ]
    decisions, _ = plan_escalation_window(
        "c", cascade, items, MODELS, clusters_of(cascade, 10, 5),
        EscalationLimit.reserve(100 * COSTS[2]), BOUNDS,
    )  # fmt: skip
    assert [d for d in decisions if d.role == "escalation" and d.model == "dear"] == []


def test_a_query_whose_hints_forbid_a_probe_model_is_answered_directly(
    cascade: FittedCascade,
) -> None:
    queries = predicted(20, QueryHints(allowed_models=["cheap-a", "dear"]))
    assignments, report = route_cascade_window(
        "c", policy(6.0), cascade, queries, MODELS, clusters_of(cascade, 20, 7), BOUNDS
    )
    assert report.probe_queries == 0 and report.escalation_reserve_usd == 0.0
    assert {a.role for a in assignments} == {"answer"}
    assert {a.model for a in assignments} <= {"cheap-a", "dear"}


def test_without_a_fitted_cascade_the_first_answer_is_accepted() -> None:
    queries = predicted(2)
    decisions, report = accept_without_scorer(
        "c", probed(queries, [[None, "b"], [None, None]]), MODELS, MODELS, BOUNDS
    )
    assert [(d.role, d.model) for d in decisions] == [("probe", "cheap-b"), ("escalation", "dear")]
    assert report.escalation_queries == 1


def test_without_a_fitted_cascade_only_models_the_hints_allow_answer() -> None:
    # q0 allows the panel only: asked again of its cheapest panel model. q1 forbids
    # cheap-a: cheap-b's answer is accepted, not cheap-a's, which came first.
    queries = predicted(1, QueryHints(allowed_models=PANEL))
    queries += predicted(1, QueryHints(allowed_models=["cheap-b", "dear"]))
    decisions, _ = accept_without_scorer(
        "c", probed(queries, [[None, None], ["a", "b"]]), MODELS, MODELS, BOUNDS
    )
    roles = [(d.role, d.model) for d in decisions]
    assert roles == [("escalation", "cheap-a"), ("probe", "cheap-b")]
    assert decisions[1].metadata[CASCADE_METADATA_KEY] == {"response": "b"}


# ------------------------------------------- the query's cluster, from stage to stage


class CountingState:
    """RouterState's part the cascade stages use: the pools' fitted cascades, and an
    embedder that records what it embedded (one fixed vector per text)."""

    def __init__(self, cascade: FittedCascade) -> None:
        self.cascades: dict[str, FittedCascade | None] = {"c": cascade}
        self.embedded: list[str] = []

    def vectors(self, texts: list[str]) -> NDArray[np.float32]:
        return np.vstack([unit_vectors(1, zlib.crc32(t.encode())) for t in texts])

    async def embed(self, texts: list[str]) -> NDArray[np.float32]:
        self.embedded += texts
        return self.vectors(texts)


def stream_stage(solver: ThreadPoolExecutor) -> WindowStage:
    settings = Settings(router_models=MODELS, router_pools={"c": policy(6.0)})
    ledger = SimpleNamespace(
        account=lambda pool: PoolAccount(escalation_reserve_usd=50.0),
        live_reserve_usd=lambda pool, now: 50.0,
    )
    return cast(WindowStage, SimpleNamespace(settings=settings, ledger=ledger, solver=solver))


def answered_probes(
    assignments: list[Assignment], disagree: frozenset[str] = frozenset()
) -> list[ProbedQuery]:
    """What the probe gatherer forwards once each probe's model worker answered
    (the worker copies the assignment's metadata into its response): the panel
    agrees on a query's answer unless its id is in `disagree`."""
    pending: dict[str, PendingProbes | None] = {}
    for probe in (a for a in assignments if a.role == "probe"):
        answer = "y" if probe.query_id in disagree and probe.model == PANEL[1] else "x"
        response = ModelResponse(
            query_id=probe.query_id, model=probe.model, pool=probe.pool, response=answer,
            metadata=probe.metadata, role="probe", final=False,
        )  # fmt: skip
        pending[probe.query_id] = add_answer(pending.get(probe.query_id), response, 0.0)
    return [probed_query(p) for p in pending.values() if p is not None and is_complete(p)]


async def test_the_escalation_stage_reads_the_cluster_the_first_stage_carried(
    cascade: FittedCascade,
) -> None:
    state = CountingState(cascade)
    with ThreadPoolExecutor(1) as solver:
        stage = stream_stage(solver)
        routing = CascadeRouting(cast(RouterState, state))
        routed = await routing.solve_first_stage(stage, "c", predicted(40), BOUNDS, 0.0)
        assert routed is not None and routed[1].probe_queries > 0
        probed_queries = answered_probes(routed[0])
        assert len(probed_queries) == routed[1].probe_queries
        texts = [p.predicted.query.text for p in probed_queries]
        assert [p.cascade_cluster for p in probed_queries] == (
            cascade.policy.clusters(state.vectors(texts)).tolist()
        )
        state.embedded.clear()
        decisions, _ = await decide(stage, cast(RouterState, state), "c", probed_queries, "w2")
    assert state.embedded == []  # before: every probed query's text embedded again
    assert [d.query_id for d in decisions] == [p.predicted.query.query_id for p in probed_queries]


async def test_a_query_without_a_cluster_of_the_current_fit_is_embedded_again(
    cascade: FittedCascade,
) -> None:
    """An older router's record carries no cluster; after a refit the carried one is
    another fit's. Either way the escalation stage embeds that query, and only it."""
    state = CountingState(cascade)
    queries = predicted(3)
    old, refitted, carried = probed(queries, [["x", "x"]] * 3)
    refitted = refitted.model_copy(update={"cascade_cluster": 0, "cascade_fit": "earlier"})
    carried = carried.model_copy(update={"cascade_cluster": 1, "cascade_fit": cascade.fit_id})
    records = [old, refitted, carried]
    texts = [p.predicted.query.text for p in records]
    clusters = await cascade_clusters(cast(RouterState, state), cascade, records, texts)
    assert state.embedded == ["question 0", "question 1"]
    expected = cascade.policy.clusters(state.vectors(["question 0", "question 1"])).tolist()
    assert clusters.tolist() == [*expected, 1]


def test_a_fit_of_the_same_outcomes_names_the_same_clusters(cascade: FittedCascade) -> None:
    """A router restarted on the same outcomes, or another router that fitted them,
    reads the clusters the first fit carried (they are the same); a fit on other
    outcomes names other clusters."""
    n = 400
    responses, truth, costs = recorded(n, seed=1)
    predicted = np.tile([0.7, 0.7, 0.95], (n, 1))
    ids = [f"q{i}" for i in range(n)]

    def fitted(vectors: NDArray[np.float32]) -> FittedCascade:
        return FittedCascade(fit_cascade(ids, vectors, responses, predicted, truth, costs), MODELS)

    assert fitted(unit_vectors(n, 1)).fit_id == cascade.fit_id
    assert fitted(unit_vectors(n, 2)).fit_id != cascade.fit_id


def test_an_older_probed_record_without_a_cluster_is_still_read(
    cascade: FittedCascade,
) -> None:
    (record,) = probed(predicted(1), [["x", "y"]])
    carried = {"cascade_cluster": True, "cascade_fit": True}
    raw = record.model_dump_json(exclude={**carried, "predicted": carried})
    assert "cascade_cluster" not in raw
    read = ProbedQuery.model_validate_json(raw)
    assert read.cascade_cluster is None and read.cascade_fit is None


# ------------------------------------ the query's cluster, from prediction to first stage


def predicted_with_clusters(
    state: CountingState, queries: list[PredictedQuery]
) -> list[PredictedQuery]:
    """The queries as the predict stage forwards them: each with its cluster under its
    pool's fitted cascade, from the vector it was predicted with (RouterState.predict)."""
    vectors = state.vectors([q.query.text for q in queries])
    clusters, fits = pool_clusters(state.cascades, [q.query.pool for q in queries], vectors)
    batch = PredictedBatch(
        models=MODELS,
        queries=[q.query for q in queries],
        quality=[q.quality for q in queries],
        cost_usd=[q.cost_usd for q in queries],
        support=[[0.0] * len(MODELS) for _ in queries],
        cascade_cluster=clusters,
        cascade_fit=fits,
    )
    return PredictedBatch.model_validate_json(batch.model_dump_json()).predictions()


async def test_the_first_stage_reads_the_cluster_the_predict_stage_carried(
    cascade: FittedCascade,
) -> None:
    """The first stage embeds none of its window's queries and plans exactly what it
    planned when it embedded them (before: one call embedding all 40 texts)."""
    state = CountingState(cascade)
    queries = predicted_with_clusters(state, predicted(40))
    assert all(q.cascade_fit == cascade.fit_id for q in queries)
    with ThreadPoolExecutor(1) as solver:
        stage = stream_stage(solver)
        routed = await CascadeRouting(cast(RouterState, state)).solve_first_stage(
            stage, "c", queries, BOUNDS, 0.0
        )
    assert state.embedded == []
    assert routed is not None and routed[1].probe_queries > 0
    embedded = cascade.policy.clusters(state.vectors([q.query.text for q in queries]))
    expected = route_cascade_window(
        "c",
        policy(6.0),
        cascade,
        queries,
        MODELS,
        embedded,
        BOUNDS,
        solver=stage.settings.router_solver,
        tie_tolerance=stage.settings.router_tie_tolerance,
        exploration_share=stage.settings.router_exploration_share,
    )  # the old path: the window's texts embedded again
    assert routed[0] == expected[0]
    assert routed[1].model_dump(exclude={"solve_seconds"}) == expected[1].model_dump(
        exclude={"solve_seconds"}
    )
    # The probes carry the cluster on to the escalation stage, as before.
    probed_queries = answered_probes(routed[0])
    assert {p.cascade_fit for p in probed_queries} == {cascade.fit_id}


async def test_a_prediction_without_a_cluster_of_the_current_fit_is_embedded_again(
    cascade: FittedCascade,
) -> None:
    """A prediction made before the pool's cascade was fitted (or by an older router)
    carries no cluster; one made before a refit carries another fit's: the first
    stage embeds those queries, and only them."""
    state = CountingState(cascade)
    queries = predicted_with_clusters(state, predicted(3))
    old = queries[0].model_copy(update={"cascade_cluster": None, "cascade_fit": None})
    refitted = queries[1].model_copy(update={"cascade_fit": "earlier"})
    with ThreadPoolExecutor(1) as solver:
        routed = await CascadeRouting(cast(RouterState, state)).solve_first_stage(
            stream_stage(solver), "c", [old, refitted, queries[2]], BOUNDS, 0.0
        )
    assert routed is not None
    assert state.embedded == ["question 0", "question 1"]


def test_only_queries_of_a_fitted_cascade_pool_carry_a_cluster(cascade: FittedCascade) -> None:
    vectors = unit_vectors(4, 8)
    cascades: dict[str, FittedCascade | None] = {"c": cascade, "unfitted": None}
    clusters, fits = pool_clusters(cascades, ["c", "default", "unfitted", "c"], vectors)
    expected = cascade.policy.clusters(vectors[[0, 3]]).tolist()
    assert clusters == [expected[0], None, None, expected[1]]
    assert fits == [cascade.fit_id, None, None, cascade.fit_id]
    assert pool_clusters(cascades, ["default", "unfitted"], vectors[:2]) == ([], [])


def test_an_older_prediction_without_a_cascade_cluster_is_still_read() -> None:
    (query,) = predicted(1)
    raw = query.model_dump_json(exclude={"cascade_cluster", "cascade_fit"})
    assert "cascade_cluster" not in raw
    read = PredictedQuery.model_validate_json(raw)
    assert read.cascade_cluster is None and read.cascade_fit is None
    batch = PredictedBatch(
        models=MODELS, queries=[query.query], quality=[query.quality],
        cost_usd=[query.cost_usd], support=[[0.0] * len(MODELS)],
    )  # fmt: skip
    raw = batch.model_dump_json(exclude={"cascade_cluster", "cascade_fit"})
    (row,) = PredictedBatch.model_validate_json(raw).predictions()
    assert row.cascade_cluster is None and row.cascade_fit is None


def test_a_batch_with_cascade_clusters_for_some_queries_only_is_refused() -> None:
    (query,) = predicted(1)
    with pytest.raises(ValueError, match="one value per query"):
        PredictedBatch(
            models=MODELS, queries=[query.query, query.query], quality=[query.quality] * 2,
            cost_usd=[query.cost_usd] * 2, support=[[0.0] * len(MODELS)] * 2,
            cascade_cluster=[1], cascade_fit=["f"],
        )  # fmt: skip


def test_a_probed_query_is_read_in_this_router_s_model_order() -> None:
    """Probed by a router whose ROUTER_MODELS were in another order, a query's
    predictions are read by model name, not position: read by position, the dear
    model's quality and cost were the cheap one's."""
    first = predicted(1)[0]
    reordered = first.model_copy(
        update={
            "models": list(reversed(MODELS)),
            "quality": list(reversed(first.quality)),
            "cost_usd": list(reversed(first.cost_usd)),
        }
    )
    raw = encode(probed([reordered], [["A", "A"]])[0])
    read = read_probed(raw, MODELS)
    assert read.predicted.models == MODELS
    assert read.predicted.quality == first.quality
    assert read.predicted.cost_usd == first.cost_usd
    with pytest.raises(BadEvent, match="none of which this router routes to"):
        read_probed(raw, ["another-model"])


# ------------------------------------------------------------------ quality mode


def quality_policy(target: float) -> PoolPolicy:
    return PoolPolicy(mode="quality", quality_target=target, cascade=True)


@pytest.mark.parametrize("target", [0.75, 0.8, 0.85])
def test_a_quality_pool_s_two_stages_reach_its_target_on_predictions(
    cascade: FittedCascade, target: float
) -> None:
    """The first stage asks its probed queries for the mean quality that meets the
    target with its direct answers; the escalation window reaches it at least cost,
    so the window as a whole meets the target, as the one-shot router's would."""
    n = 60
    queries = predicted(n)
    assignments, first = route_cascade_window(
        "c", quality_policy(target), cascade, queries, MODELS, clusters_of(cascade, n, 2), BOUNDS
    )
    assert (first.mode, first.quality_target, first.window_budget_usd) == ("quality", target, None)
    assert first.escalation_reserve_usd == 0.0 and first.probe_queries > 0
    assert first.predicted_mean_quality >= target - 1e-9
    direct = [a for a in assignments if a.role == "answer"]
    disagree = {q.query.query_id for q in queries[::3]}
    probed_queries = answered_probes(assignments, frozenset(disagree))
    assert len(probed_queries) == first.probe_queries
    needed = {p.quality_needed for p in probed_queries}
    assert len(needed) == 1  # the window's probed queries share its need
    (need,) = needed
    assert need is not None
    direct_quality = sum(a.predicted_quality for a in direct)
    assert need * len(probed_queries) + direct_quality == pytest.approx(target * n)

    decisions, second = plan_escalation_window(
        "c", cascade, probed_queries, MODELS,
        clusters_of(cascade, len(probed_queries), 4), EscalationLimit.needed(need), BOUNDS,
    )  # fmt: skip
    assert (second.mode, second.quality_target, second.window_budget_usd) == ("quality", need, None)
    assert second.solver_status in ("optimal", "near_optimal")
    decided_quality = [d.predicted_quality for d in decisions]
    assert np.mean(decided_quality) >= need - 1e-9
    assert (direct_quality + sum(decided_quality)) / n >= target - 1e-9
    # At least cost: not every query is escalated, and the disagreeing ones first;
    # both stages together cost less than the one-shot plan at the same target.
    escalated = {d.query_id for d in decisions if d.role == "escalation"}
    assert 0 < len(escalated) < len(decisions)
    assert escalated <= disagree
    quality = np.array([q.quality for q in queries])
    cost = np.array([q.cost_usd for q in queries])
    one_shot = solve(WindowProblem(quality, cost, "quality", quality_target=target), "exact")
    assert first.predicted_spend_usd + second.escalation_spend_usd < one_shot.total_cost_usd


@pytest.mark.parametrize(
    ("direct_quality", "needed"),
    [(40.0, 0.8), (41.0, 0.7), (49.0, 0.0), (30.0, 1.0)],
)
def test_a_quality_window_asks_its_probed_queries_for_what_its_direct_answers_leave(
    direct_quality: float, needed: float
) -> None:
    """Target 0.8 over 60 queries, 50 answered directly, 10 probed: the need is what
    makes up the target, within [0, 1] (direct answers above it ask nothing; a
    target out of reach asks for the most there is)."""
    limit = FirstStageLimit("quality", 0.8)
    escalations = limit.for_escalations(0.0, direct_quality, 60, 10)
    assert escalations.quality_target == pytest.approx(needed)
    assert escalations.budget_usd is None
    budget = FirstStageLimit("budget", 100.0).for_escalations(70.0, direct_quality, 60, 10)
    assert (budget.budget_usd, budget.quality_target) == (pytest.approx(30.0), None)


def test_a_query_no_probe_answered_counts_its_forced_answer_towards_the_need(
    cascade: FittedCascade,
) -> None:
    """Quality mode: a query none of whose probes answered is escalated of necessity
    (here its hints allow only the panel: asked again of cheap-a); its forced
    answer counts towards the need, not as a quality it can never have, which the
    other queries would make up with needless escalations to "dear"."""
    queries = predicted(10) + predicted(1, QueryHints(allowed_models=PANEL))
    answers = [["x", "x"]] * 10 + [[None, None]]
    decisions, report = plan_escalation_window(
        "c", cascade, probed(queries, answers), MODELS, clusters_of(cascade, 11, 9),
        EscalationLimit.needed(0.74), BOUNDS,
    )  # fmt: skip
    assert [d.role for d in decisions] == ["probe"] * 10 + ["escalation"]
    assert decisions[-1].model == "cheap-a"
    assert report.escalation_spend_usd == pytest.approx(COSTS[0])


@pytest.mark.parametrize("need", [0.6, 0.7])
def test_a_panel_model_asked_again_counts_its_one_shot_prediction(
    cascade: FittedCascade, need: float
) -> None:
    """Quality mode: the first query's hints allow only the panel and no probe
    answered, so cheap-a is asked again; the second's probes agree. The answer
    asked again counted as quality 0 (its probe's posterior, zeroed for want of an
    answer), so the second query was escalated to "dear" for nothing and the window
    still read short of its need."""
    queries = predicted(1, QueryHints(allowed_models=PANEL)) + predicted(2)[1:]
    clusters = clusters_of(cascade, 2, 3)
    decisions, report = plan_escalation_window(
        "c", cascade, probed(queries, [[None, None], ["x", "x"]]), MODELS, clusters,
        EscalationLimit.needed(need), BOUNDS,
    )  # fmt: skip
    _, alone = plan_escalation_window(
        "c", cascade, probed(queries[1:], [["x", "x"]]), MODELS, clusters[1:],
        EscalationLimit.needed(need), BOUNDS,
    )  # fmt: skip
    assert (decisions[0].role, decisions[0].model) == ("escalation", "cheap-a")
    assert decisions[0].predicted_quality == pytest.approx(queries[0].quality[0])
    assert decisions[1].role == "probe"  # accepted, as it is on its own
    assert alone.escalation_queries == 0
    assert report.solver_status != "infeasible_target_best_quality_plan"


def test_an_escalation_window_reads_what_each_first_stage_asked_of_its_queries() -> None:
    """Queries of several first-stage windows meet in one escalation window: it must
    reach their mean need; a record without one (an older router's, or probed while
    the pool was in budget mode) needs the pool's target."""
    queries = predicted(3)
    records = [
        ProbedQuery(predicted=queries[0], answers=[], quality_needed=0.9),
        ProbedQuery(predicted=queries[1], answers=[], quality_needed=0.5),
        ProbedQuery(predicted=queries[2], answers=[]),
    ]
    assert escalation_quality_needed(records, 0.75) == pytest.approx((0.9 + 0.5 + 0.75) / 3)
    assert escalation_quality_needed(records[:2], 0.75) == pytest.approx(0.7)


def test_a_quality_escalation_window_short_of_its_need_says_so(cascade: FittedCascade) -> None:
    """No plan reaches a mean of 1.0 on these predictions: every query goes to its
    best option and the report says the target was out of reach."""
    queries = predicted(4)
    decisions, report = plan_escalation_window(
        "c", cascade, probed(queries, [["x", "y"]] * 4), MODELS, clusters_of(cascade, 4, 7),
        EscalationLimit.needed(1.0), BOUNDS,
    )  # fmt: skip
    assert report.solver_status == "infeasible_target_best_quality_plan"
    assert [d.model for d in decisions] == ["dear"] * 4


async def test_the_escalation_stage_of_a_quality_pool_asks_what_the_first_stage_did(
    cascade: FittedCascade,
) -> None:
    """On the stream: the first stage's need travels on the probes' metadata to the
    ProbedQuery, and `decide` plans the escalation window in quality mode from it."""
    state = CountingState(cascade)
    with ThreadPoolExecutor(1) as solver:
        settings = Settings(router_models=MODELS, router_pools={"c": quality_policy(0.8)})
        ledger = SimpleNamespace(account=lambda pool: PoolAccount())
        stage = cast(WindowStage, SimpleNamespace(settings=settings, ledger=ledger, solver=solver))
        routed = await CascadeRouting(cast(RouterState, state)).solve_first_stage(
            stage, "c", predicted(40), BOUNDS, 0.0
        )
        assert routed is not None and routed[1].probe_queries > 0
        probed_queries = answered_probes(routed[0], frozenset({"q0", "q3", "q6", "q9"}))
        # Half of them as if probed by another window that asked for less.
        half = len(probed_queries) // 2
        mixed = probed_queries[:half] + [
            p.model_copy(update={"quality_needed": 0.5}) for p in probed_queries[half:]
        ]
        decisions, report = await decide(stage, cast(RouterState, state), "c", mixed, "w2")
    assert report.mode == "quality" and report.window_budget_usd is None
    first_need = probed_queries[0].quality_needed
    assert first_need is not None
    mean_need = (half * first_need + (len(mixed) - half) * 0.5) / len(mixed)
    assert report.quality_target == pytest.approx(mean_need)
    assert np.mean([d.predicted_quality for d in decisions]) >= report.quality_target - 1e-9


def test_a_probe_option_never_counts_on_a_model_the_hints_forbid(
    cascade: FittedCascade,
) -> None:
    """The fitted options escalate doubtful answers to "dear". A query whose hints
    allow only the panel may be probed, but only to accept: the first stage read
    0.90 (the target) through "dear", which the escalation stage never asks, and
    said near_optimal."""
    assert {o.escalate_to for o in cascade.policy.options} == {NEVER, MODELS.index("dear")}
    free, _ = route_cascade_window(
        "c", quality_policy(0.9), cascade, predicted(20), MODELS, clusters_of(cascade, 20, 7),
        BOUNDS,
    )  # fmt: skip
    assert {a.role for a in free} == {"probe"}  # the control: without hints, probed
    panel_only = QueryHints(allowed_models=PANEL)
    _, report = route_cascade_window(
        "c", quality_policy(0.9), cascade, predicted(20, panel_only), MODELS,
        clusters_of(cascade, 20, 7), BOUNDS,
    )  # fmt: skip
    assert report.solver_status == "infeasible_target_best_quality_plan"
    assert report.predicted_mean_quality < 0.9


def test_a_quality_window_that_cannot_reach_its_target_takes_its_best_plan(
    cascade: FittedCascade,
) -> None:
    """Neither plan reaches 0.9 when the hints allow only the panel: the window's
    plan is the better of the two, probing (the accepted answer reads above 0.7),
    not the direct plan (0.7) it kept before while saying best quality."""
    queries = predicted(20, QueryHints(allowed_models=PANEL))
    assignments, report = route_cascade_window(
        "c", quality_policy(0.9), cascade, queries, MODELS, clusters_of(cascade, 20, 7), BOUNDS
    )
    assert report.solver_status == "infeasible_target_best_quality_plan"
    assert report.probe_queries > 0 and report.predicted_mean_quality > 0.7
    assert {a.role for a in assignments} == {"probe"}
