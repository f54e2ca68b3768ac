"""A pool's window of predicted queries -> assignments and a report (no Kafka)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from schemas import PredictedQuery, QueryEvent, QueryHints
from workers.config import PoolPolicy
from workers.routing.windows import (
    WindowBounds,
    bounded_created_at,
    broker_time,
    route_window,
    traffic_span,
    window_budget_usd,
)

MODELS = ["cheap", "mid", "dear"]
START = datetime(2026, 11, 24, tzinfo=UTC)
BOUNDS = WindowBounds("w1", START, START + timedelta(seconds=2))


def predicted(i: int, quality: list[float], cost: list[float]) -> PredictedQuery:
    query = QueryEvent(query_id=f"q{i}", text=f"question {i}", metadata={"tenant": "t"})
    return PredictedQuery(query=query, models=MODELS, quality=quality, cost_usd=cost)


def window(n: int) -> list[PredictedQuery]:
    return [predicted(i, [0.5, 0.7, 0.9], [0.001, 0.01, 0.1]) for i in range(n)]


# Each kind of budget and what it gives a window of BOUNDS' 2 s and 10 queries.
EACH_KIND_OF_BUDGET = [
    (PoolPolicy(mode="budget", window_budget_usd=3.0), 3.0),
    (PoolPolicy(mode="budget", budget_per_hour_usd=3600.0), 2.0),  # 2 s of $1/s
    (PoolPolicy(mode="budget", budget_per_query_usd=0.5), 5.0),  # 10 queries
]


@pytest.mark.parametrize(("policy", "expected"), EACH_KIND_OF_BUDGET)
def test_each_kind_of_budget_gives_the_window_its_share(
    policy: PoolPolicy, expected: float
) -> None:
    assert window_budget_usd(policy, BOUNDS, queries=10) == pytest.approx(expected)


def test_every_query_is_assigned_within_budget_to_the_pools_models() -> None:
    policy = PoolPolicy(mode="budget", budget_per_query_usd=0.02, models=["cheap", "mid"])
    assignments, report = route_window("gold", policy, window(10), MODELS, BOUNDS)

    assert sorted(a.query_id for a in assignments) == [f"q{i}" for i in range(10)]
    assert {a.model for a in assignments} <= {"cheap", "mid"}
    assert report.window_budget_usd == pytest.approx(0.2)
    assert report.predicted_spend_usd <= 0.2 + 1e-12
    # Everything on "mid" costs 0.1 and fits: the best plan within budget.
    assert report.assignments_per_model == {"mid": 10}
    assert all(a.metadata == {"tenant": "t"} and a.window_id == "w1" for a in assignments)
    assert report.solver_status in ("optimal", "near_optimal")


def test_capacities_and_the_quality_target_shape_the_plan() -> None:
    policy = PoolPolicy(mode="quality", quality_target=0.7)
    assignments, report = route_window(
        "default", policy, window(10), MODELS, BOUNDS, capacities={"mid": 4}, solver="exact"
    )
    # Mean 0.7 at least cost with at most 4 on "mid": 4 mid + 3 dear + 3 cheap
    # (quality 2.8 + 2.7 + 1.5 = 7.0), cost 0.04 + 0.3 + 0.003.
    assert report.assignments_per_model == {"cheap": 3, "mid": 4, "dear": 3}
    assert report.predicted_mean_quality == pytest.approx(0.7)
    assert report.predicted_spend_usd == pytest.approx(0.343)
    assert len(assignments) == 10


def hinted(i: int, **hints: object) -> PredictedQuery:
    query = QueryEvent(query_id=f"h{i}", text="x", hints=QueryHints(**hints))  # type: ignore[arg-type]
    return PredictedQuery(
        query=query, models=MODELS, quality=[0.5, 0.7, 0.9], cost_usd=[0.001, 0.01, 0.1]
    )


@pytest.mark.parametrize("solver", ["exact", "fast"])
def test_hints_limit_each_query_to_the_models_they_allow(solver: str) -> None:
    queries = [
        hinted(0, allowed_models=["cheap"]),  # strict, though the budget buys better
        hinted(1, max_cost_usd=0.02),  # "dear" is out
        hinted(2, min_quality=0.8),  # only "dear" is good enough
        hinted(3, max_cost_usd=0.0001),  # nothing that cheap: the hint is dropped
    ]
    policy = PoolPolicy(mode="budget", budget_per_query_usd=1.0)
    assignments, _ = route_window("default", policy, queries, MODELS, BOUNDS, solver=solver)  # type: ignore[arg-type]
    chosen = {a.query_id: a.model for a in assignments}
    assert chosen == {"h0": "cheap", "h1": "mid", "h2": "dear", "h3": "dear"}


@pytest.mark.parametrize("solver", ["exact", "fast"])
def test_a_hint_holds_in_quality_mode_and_in_the_fallback_plans(solver: str) -> None:
    queries = [hinted(0, allowed_models=["mid"]), hinted(1, allowed_models=["dear"])]
    for policy in (
        PoolPolicy(mode="quality", quality_target=0.1),
        PoolPolicy(mode="quality", quality_target=1.0),  # unreachable: best plan
        PoolPolicy(mode="budget", window_budget_usd=0.0),  # unreachable: cheapest plan
    ):
        assignments, report = route_window(
            "default",
            policy,
            queries,
            MODELS,
            BOUNDS,
            solver=solver,  # type: ignore[arg-type]
        )
        assert [a.model for a in assignments] == ["mid", "dear"], report.solver_status
        assert report.predicted_spend_usd == pytest.approx(0.11)


# ---------------------------------------------------------------- traffic span

T0 = datetime(2026, 1, 1, tzinfo=UTC)
FIVE_SECONDS = timedelta(seconds=5)


def at(*seconds: float) -> list[datetime]:
    return [T0 + timedelta(seconds=s) for s in seconds]


def test_windows_of_steady_traffic_tile_production_time() -> None:
    first = traffic_span(at(0.1, 2.0, 4.9), None, FIVE_SECONDS)
    second = traffic_span(at(5.3, 9.8), first[1], FIVE_SECONDS)
    assert second == (first[1], T0 + timedelta(seconds=9.8))  # starts where the last ended


def test_after_an_idle_spell_a_window_earns_one_window_length() -> None:
    start, end = traffic_span(at(100.0), T0, FIVE_SECONDS)
    assert (end - start) == FIVE_SECONDS


@pytest.mark.parametrize("billed_until", [None, T0 - timedelta(minutes=10)])
@pytest.mark.parametrize(
    "times",
    [
        (100.0, 100.0),  # made at the same instant
        tuple(100.0 - i * 1e-5 for i in range(100)),  # a burst within 1 ms
        (97.0, 98.0, 100.0),  # spread over less than a window
    ],
)
def test_after_an_idle_spell_a_burst_earns_as_much_as_a_lone_query(
    billed_until: datetime | None, times: tuple[float, ...]
) -> None:
    # A periodic batch job after idle minutes (or the pool's first window): its
    # queries stand for at least one window length, as one query alone does; a
    # window spanning ~0 s would get no share of an hourly budget at all.
    start, end = traffic_span(at(*times), billed_until, FIVE_SECONDS)
    assert end == T0 + timedelta(seconds=100)
    assert end - start == FIVE_SECONDS


def test_a_first_window_longer_than_a_window_begins_one_mean_gap_before_its_first() -> None:
    # A backlog found at the start: 12 s of traffic, one 6 s gap (at most a window) before.
    start, end = traffic_span(at(1.0, 7.0, 13.0), None, FIVE_SECONDS)
    assert (start, end) == (T0 - timedelta(seconds=4), T0 + timedelta(seconds=13))


def test_a_backlog_read_late_brings_the_budget_of_the_time_it_was_produced_in() -> None:
    # 12 s of traffic read in one window after a restart: its span is the 12 s, not 5.
    start, end = traffic_span(at(10.0, 16.0, 22.0), T0 + timedelta(seconds=9.9), FIVE_SECONDS)
    assert (end - start).total_seconds() == pytest.approx(12.1)


def test_no_second_is_billed_twice() -> None:
    # The pool's billing already stands past this window's queries (a producer whose
    # clock lags, or queries replayed after a restart): no new time, no new budget.
    start, end = traffic_span(at(3.0), T0 + timedelta(seconds=8), FIVE_SECONDS)
    assert start == end == T0 + timedelta(seconds=8)
    # Partly billed: only the part after the billed point counts.
    start, end = traffic_span(at(3.0, 6.0, 9.0), T0 + timedelta(seconds=8), FIVE_SECONDS)
    assert (start, end) == (T0 + timedelta(seconds=8), T0 + timedelta(seconds=9))


def test_a_lagging_producer_s_query_does_not_bill_the_pool_s_idle_spell() -> None:
    """Billing stands at T0; the pool idle for 30 minutes; then a window holds a
    current query and one from a producer 40 minutes behind (made before the
    billed point: no new time). The stale query stretched the window back to T0:
    1,800 s billed (at $36/h, $18 for two queries) where the current one earns a
    window length."""
    now = T0 + timedelta(minutes=30)
    lagging = now - timedelta(minutes=40)
    assert traffic_span([lagging, now], T0, FIVE_SECONDS) == (now - FIVE_SECONDS, now)


def test_consecutive_windows_never_overlap() -> None:
    billed: datetime | None = None
    spans = []
    windows = [(0.5, 4.0), (3.0, 7.0), (6.5,), (12.0, 13.0), (13.5, 13.5), (60.0, 60.0)]
    for times in windows:  # out-of-order stamps, bursts, an idle spell
        span = traffic_span(at(*times), billed, FIVE_SECONDS)
        billed = span[1]
        spans.append(span)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end  # so the pool's billed_until (each window's end) never goes back
    assert all(start <= end for start, end in spans)
    assert spans[-1] == (T0 + timedelta(seconds=55), T0 + timedelta(seconds=60))


def test_a_time_without_a_zone_is_taken_as_utc() -> None:
    query = QueryEvent.model_validate(
        {"query_id": "q", "text": "t", "created_at": "2026-01-01T00:00:05"}
    )
    assert query.created_at == T0 + FIVE_SECONDS


SKEW = timedelta(seconds=60)


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        (T0 + timedelta(hours=1), T0 + SKEW),  # an hour ahead: held at the skew allowance
        (T0 - timedelta(hours=1), T0 - SKEW),  # an hour behind: likewise
        (T0 + timedelta(seconds=20), T0 + timedelta(seconds=20)),  # within the allowance: kept
    ],
)
def test_created_at_is_bounded_by_the_broker_timestamp(stamp: datetime, expected: datetime) -> None:
    assert bounded_created_at(stamp, T0, T0 + timedelta(seconds=1), SKEW) == expected


def test_created_at_never_runs_ahead_of_the_routers_clock() -> None:
    # A record timestamp set by the producer (CreateTime) can be forged too.
    broker_time = T0 + timedelta(hours=1)
    assert bounded_created_at(broker_time, broker_time, T0, SKEW) == T0 + SKEW


@pytest.mark.parametrize("timestamp", [1.7e15, 1e300, float("inf"), float("nan"), -1.0, None])
def test_a_record_timestamp_no_datetime_holds_is_the_readers_clock(
    timestamp: float | None,
) -> None:
    """Microseconds given for milliseconds is year 58892 (ValueError); -1 is none."""
    assert broker_time(timestamp, T0) == T0


def test_a_record_timestamp_is_its_moment() -> None:
    assert broker_time((T0 + SKEW).timestamp(), T0) == T0 + SKEW


@pytest.mark.parametrize("solver", ["fast", "exact"])
@pytest.mark.parametrize(
    "policy",
    [
        PoolPolicy(mode="quality", quality_target=0.2),
        PoolPolicy(mode="budget", window_budget_usd=0.6),
    ],
)
def test_allowed_models_hold_when_a_capacity_makes_a_forbidden_pair_cheapest(
    solver: str, policy: PoolPolicy
) -> None:
    """h0 may only take "mid", which holds one query; q1 is cheap there too. Forbidden
    pairs made merely worse than allowed ones (the old `exclude`) gave h0 "cheap"
    through the swap q1 -> "mid", reported optimal with quality -1 in the mean."""
    queries = [
        hinted(0, allowed_models=["mid"]).model_copy(
            update={"quality": [0.6, 0.6, 0.0], "cost_usd": [0.1, 0.1, 9.0]}
        ),
        predicted(1, [0.6, 0.6, 0.0], [1.0, 0.1, 9.0]),
    ]
    policy = policy.model_copy(update={"models": ["cheap", "mid"]})
    out, report = route_window(
        "gold",
        policy,
        queries,
        MODELS,
        BOUNDS,
        capacities={"mid": 1},
        solver=solver,  # type: ignore[arg-type]
    )
    assert [(a.query_id, a.model) for a in out] == [("h0", "mid"), ("q1", "cheap")]
    assert report.predicted_mean_quality == pytest.approx(0.6)
    if policy.mode == "budget":  # the only allowed plan costs 1.1
        assert report.solver_status == "infeasible_budget_cheapest_plan"


@pytest.mark.parametrize("solver", ["fast", "exact"])
def test_forbidding_an_unrelated_model_does_not_change_the_choice(solver: str) -> None:
    """The tie penalty is relative to the dearest model a query may take; forbidding a
    cheap model the plan would not use once moved the choice to the dearer "mid"."""
    policy = PoolPolicy(mode="budget", window_budget_usd=1.0)
    chosen = []
    for hints in ({}, {"allowed_models": ["cheap", "mid"]}):
        query = hinted(0, **hints).model_copy(
            update={"quality": [0.80, 0.84, 0.5], "cost_usd": [0.001, 0.01, 0.001]}
        )
        out, _ = route_window(
            "gold",
            policy,
            [query],
            MODELS,
            BOUNDS,
            solver=solver,
            tie_tolerance=0.05,  # type: ignore[arg-type]
        )
        chosen.append(out[0].model)
    assert chosen == ["cheap", "cheap"]
