"""A window's assignments' metrics (workers/stream/metrics.py `observe_assignments`),
counted per model at once: the same totals as one count per assignment."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from schemas import Assignment, WindowReport
from workers.stream.metrics import observe_assignments
from workers.stream.publishers import PoolWindow, observe_report

NOW = datetime(2026, 11, 30, tzinfo=UTC)
POOL = "metrics-test"


def assignment(model: str, quality: float, **fields: object) -> Assignment:
    return Assignment.model_validate(
        {
            "query_id": "q", "text": "t", "model": model, "pool": POOL, "window_id": "w",
            "window_start": NOW, "window_end": NOW, "predicted_quality": quality,
            "predicted_cost_usd": 0.1, **fields,
        }
    )  # fmt: skip


def value(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model, "pool": POOL}) or 0.0


def test_a_window_counts_assignments_quality_explorations_and_shadows_per_model() -> None:
    observe_assignments(
        POOL,
        [
            assignment("a", 0.5),
            assignment("a", 0.25, exploration=True),
            assignment("b", 0.75),
            assignment("b", 0.5, role="shadow"),
        ],
    )
    assert value("omnirouter_assignments_total", "a") == 2
    assert value("omnirouter_assignments_total", "b") == 1
    assert value("omnirouter_predicted_quality_total", "a") == pytest.approx(0.75)
    assert value("omnirouter_exploration_assignments_total", "a") == 1
    assert value("omnirouter_exploration_assignments_total", "b") == 0
    assert value("omnirouter_shadow_assignments_total", "b") == 1
    assert value("omnirouter_shadow_assignments_total", "a") == 0


def budget_report(budget: float) -> WindowReport:
    return WindowReport(
        window_id="w", pool=POOL, window_start=NOW, window_end=NOW, query_count=1,
        mode="budget", window_budget_usd=budget, predicted_spend_usd=0.0,
        predicted_mean_quality=0.5, solver="fast", solver_status="optimal", solve_seconds=0.0,
        assignments_per_model={},
    )  # fmt: skip


def test_a_cascade_pool_s_budget_is_counted_once_by_its_first_stage() -> None:
    """An escalation window's report holds the reserve its first stages kept back of
    their budgets (already counted): counted again per escalation window, $10 of
    budget read as $22, and the dashboard's budget line hid overspend."""
    name = "omnirouter_window_budget_usd_total"
    before = REGISTRY.get_sample_value(name, {"pool": POOL}) or 0.0
    observe_report(PoolWindow(POOL, 0, [], [], budget_report(10.0)))
    for _ in range(2):
        observe_report(PoolWindow(POOL, 0, [], [], budget_report(6.0), stage="escalation"))
    counted = (REGISTRY.get_sample_value(name, {"pool": POOL}) or 0.0) - before
    assert counted == pytest.approx(10.0)
