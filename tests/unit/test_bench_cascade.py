"""The cascade latency bench's pool, in either mode, and its quality figure."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from schemas import WindowReport
from workers.bench.cascade import pool_policy, weighted_mean_quality
from workers.cli import main
from workers.config import PoolPolicy

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def quality_window(queries: int, mean_quality: float) -> WindowReport:
    return WindowReport(
        window_id="w", pool="cascade", window_start=T0, window_end=T0, query_count=queries,
        mode="quality", quality_target=0.8, predicted_spend_usd=1.0,
        predicted_mean_quality=mean_quality, solver="fast", solver_status="near_optimal",
        solve_seconds=0.0, assignments_per_model={},
    )  # fmt: skip


def test_the_bench_pool_is_a_valid_cascade_pool_in_either_mode() -> None:
    budget = PoolPolicy.model_validate(pool_policy(0.002, None))
    assert (budget.mode, budget.budget_per_query_usd, budget.cascade) == ("budget", 0.002, True)
    quality = PoolPolicy.model_validate(pool_policy(0.002, 0.85))
    assert (quality.mode, quality.quality_target, quality.cascade) == ("quality", 0.85, True)
    assert quality.budget_per_query_usd is None


def test_the_first_stages_quality_is_weighted_by_their_queries() -> None:
    windows = [quality_window(30, 0.9), quality_window(10, 0.5)]
    assert weighted_mean_quality(windows) == pytest.approx((27 + 5) / 40)
    assert weighted_mean_quality([]) == 0.0


def test_a_quality_target_outside_0_to_1_is_refused_before_anything_starts() -> None:
    result = CliRunner().invoke(main, ["bench", "cascade", "--quality-target", "1.5"])
    assert result.exit_code == 2
    assert "--quality-target" in result.output
