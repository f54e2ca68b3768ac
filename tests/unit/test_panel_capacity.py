"""A first stage whose panel has a capped model: a probe takes a slot of every panel
model, so a panel model's direct answers and all probes stay within its cap."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest

from workers.routing.cascade import OptionMatrices, first_stage_problem, plan_first_stage
from workers.routing.optimizer import Method, Mode, WindowProblem
from workers.routing.panel_capacity import keeps_panel_caps

# Two cheap panel models (0, 1), a dear one (2); one probe option, better for its
# price than anything answered directly.
N = 20
QUALITY = np.tile([0.6, 0.6, 0.9], (N, 1))
COST = np.tile([1.0, 1.0, 10.0], (N, 1))
OPTIONS = OptionMatrices(np.full((N, 1), 0.85), np.full((N, 1), 3.0), np.full(N, 2.0))
PANEL = [0, 1]


def window(mode: str, capacities: tuple[int | None, ...] | None) -> WindowProblem:
    limit = 4.0 * N if mode == "budget" else 0.8
    return first_stage_problem(
        QUALITY, COST, OPTIONS, cast(Mode, mode), limit, capacities=capacities, fallback_model=2
    )


@pytest.mark.parametrize("solver", ["fast", "exact"])
@pytest.mark.parametrize("mode", ["budget", "quality"])
def test_a_capped_panel_model_holds_its_direct_answers_and_every_probe(
    solver: str, mode: str
) -> None:
    unbounded = plan_first_stage(window(mode, None), 3, cast(Method, solver), panel=PANEL)
    assert (unbounded.assignment >= 3).sum() > 6  # the cap below binds
    problem = window(mode, (6, None, None))
    plan = plan_first_stage(problem, 3, cast(Method, solver), panel=PANEL)
    probes = int((plan.assignment >= 3).sum())
    direct_on_0 = int((plan.assignment == 0).sum())
    assert probes > 0 and direct_on_0 + probes <= 6
    assert keeps_panel_caps(problem, plan.assignment, 3, PANEL)
    assert problem.meets_limit(plan.assignment)


def test_without_room_in_the_panel_nothing_is_probed() -> None:
    problem = window("budget", (0, None, None))
    plan = plan_first_stage(problem, 3, "exact", panel=PANEL)
    assert (plan.assignment < 3).all() and (plan.assignment != 0).all()
