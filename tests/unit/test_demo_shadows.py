"""The demo's summary counts each query's answer, never its shadow answer, and
includes what the shadow answers cost in the routed cost."""

from __future__ import annotations

import math

from workers.db.models import OutcomeRow
from workers.demo import answers_only, summarise
from workers.routing.dataset import load_routerbench, shipped_sample_path


def row(query_id: str, model: str, cost: float) -> OutcomeRow:
    return OutcomeRow(query_id=query_id, model=model, cost_usd=cost)


def test_a_shadow_answer_is_not_the_querys_answer_but_its_cost_is_counted() -> None:
    live = load_routerbench(shipped_sample_path()).take([0, 1])
    cheap, dear = live.models[0], live.models[1]
    rows = [row("run-0", cheap, 0.001), row("run-0", dear, 0.01), row("run-1", cheap, 0.002)]
    shadows = {("run-0", dear)}
    answers = answers_only(rows, shadows)
    assert [(r.query_id, r.model) for r in answers] == [("run-0", cheap), ("run-1", cheap)]
    summary = summarise(live, answers, [], "run", shadow_spend_usd=0.01)
    assert summary.queries_routed == 2
    assert summary.per_model == {cheap: 2}
    assert math.isclose(summary.routed.cost_usd, 0.013)
    assert summary.shadow_spend_usd == 0.01
