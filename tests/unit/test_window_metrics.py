"""A window's assignments' metrics (workers/stream/metrics.py `observe_assignments`),
counted per model at once: the same totals as one count per assignment."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from schemas import Assignment
from workers.stream.metrics import observe_assignments

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
