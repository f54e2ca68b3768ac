"""The pipeline benchmark's steady rate counts whole windows only."""

from __future__ import annotations

import pytest

from workers.bench.pipeline import steady_rate


def test_the_steady_rate_leaves_out_the_first_window_and_its_wait() -> None:
    # Windows published at 0 s, 1 s and 2 s with 10, 20 and 30 queries (a few ms apart).
    assigned = [0 + i % 3 for i in range(10)] + [1000 + i % 5 for i in range(20)]
    assigned += [2000 + i % 4 for i in range(30)]
    assert steady_rate(assigned, window_seconds=1.0) == pytest.approx(50 / 2.0, rel=0.01)
