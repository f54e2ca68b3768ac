"""The in-sample agreement bound of `omnirouter bench agreement`: rules, hulls and the
budget's allocation across tasks on hand-made data whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from workers.bench.agreement import (
    KEEP_FIRST,
    Rule,
    TaskHull,
    agreement_matrix,
    allocate,
    bound_at,
    candidate_rules,
    complete_rows,
    mix_at,
    rule_result,
    rules_hull,
    run,
    task_rows,
)
from workers.cli import main
from workers.routing.cascade import cheapest_models
from workers.routing.dataset import OutcomeTable, load_routerbench, shipped_sample_path
from workers.routing.evaluate import hull_accuracy

# Four models: probes A and B, a third voter C, a dear fallback E. Each costs the same
# on every row, and the sums of distinct subsets differ, so a cost says who was asked.
A, B, C, E = range(4)
PRICES = [1.0, 2.0, 4.0, 8.0]
RESPONSES = [
    # A and B agree ("B)" and "b" are one answer): A's answer is accepted.
    ["The answer is\nB)", "b", "a", "b"],
    # A and B disagree; C sides with B.
    ["a", "c", "C.", "d"],
    # Empty final answers agree with nothing; C sides with neither: the fallback.
    ["", None, "x", "y"],
    # A and B disagree; C sides with A.
    ["a", "b", "a", "a"],
]
SCORES = [
    [1.0, 1.0, 0.0, 1.0],
    [0.0, 1.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
    [1.0, 0.0, 1.0, 0.0],
]


def tiny_table(task: str = "t") -> OutcomeTable:
    models = ["a", "b", "c", "e"]
    return OutcomeTable(
        sample_ids=[str(i) for i in range(len(SCORES))],
        eval_names=[task] * len(SCORES),
        prompts=[f"q{i}" for i in range(len(SCORES))],
        models=models,
        scores=np.array(SCORES),
        costs=np.tile(PRICES, (len(SCORES), 1)),
        responses=[dict(zip(models, row, strict=True)) for row in RESPONSES],
    )


def test_normalised_final_answers_agree_and_empty_ones_never_do() -> None:
    agree = agreement_matrix([["b", "b", "a"], ["", "", "x"], ["x", "y", "x"]])
    assert agree[0, 0, 1] and not agree[0, 0, 2]
    assert not agree[1, 0, 1]  # both empty
    assert agree[2, 0, 2] and not agree[2, 0, 1] and not agree[2, 1, 2]


@pytest.mark.parametrize(
    ("rule", "correct", "cost"),
    [
        # r0 accepts A (1); r1, r2, r3 escalate to E (0, 1, 0); probes 3 a row, E 8 thrice.
        (Rule((A, B), E), 2.0, 4 * 3 + 3 * 8),
        # r0 A (1); r1 B (1); r2 E (1); r3 A (1); C asked on r1-r3, E on r2 only.
        (Rule((A, B, C), E), 4.0, 4 * 3 + 3 * 4 + 8),
        # The same without a fallback: r2 keeps A's (wrong) answer.
        (Rule((A, B, C), KEEP_FIRST), 3.0, 4 * 3 + 3 * 4),
        # Accepting B's answer where the pair agrees: r0 B (1), the rest as above.
        (Rule((B, A, C), E), 4.0, 4 * 3 + 3 * 4 + 8),
        (Rule((E,)), 2.0, 4 * 8),
    ],
)
def test_a_rule_accepts_agreed_answers_and_escalates_the_rest(
    rule: Rule, correct: float, cost: float
) -> None:
    rows = task_rows(tiny_table())["t"]
    assert rule_result(rule, rows) == (pytest.approx(cost), pytest.approx(correct))


def test_rules_are_drawn_from_the_cheapest_models_and_escalate_outside_the_probes() -> None:
    costs = np.array([[5.0, 1.0, 3.0, 2.0]])
    assert cheapest_models(costs, 2) == [1, 3]
    rules = candidate_rules(4, [1, 3])
    assert {r.probes[:2] for r in rules if len(r.probes) > 1} == {(1, 3), (3, 1)}
    assert all(r.fallback not in r.probes for r in rules)
    assert len(rules) == len(set(rules))
    # 4 singles; per ordered pair: 3 fallbacks (keep or either other model), and per
    # third model 2 fallbacks (keep or the last model).
    assert len(rules) == 4 + 2 * (3 + 2 * 2)


def test_the_hull_keeps_the_best_rule_per_cost_and_drops_points_under_a_chord() -> None:
    r = [Rule((j,)) for j in range(6)]
    results = [
        ((1.0, 5.0), r[0]),
        ((1.0, 7.0), r[1]),  # same cost, more correct: replaces r0
        ((2.0, 8.0), r[2]),  # under the chord (1, 7)-(3, 10)
        ((3.0, 10.0), r[3]),
        ((3.0, 10.0), r[4]),  # the same figures: the first given stays
        ((4.0, 9.0), r[5]),  # dearer and worse
    ]
    points, rules = rules_hull(results)
    assert points == [(1.0, 7.0), (3.0, 10.0)]
    assert rules == [r[1], r[3]]


HULL_A = [(0.0, 0.0), (2.0, 4.0), (6.0, 6.0)]  # slopes 2, 0.5
HULL_B = [(1.0, 1.0), (3.0, 4.0), (7.0, 5.0)]  # slopes 1.5, 0.25


@pytest.mark.parametrize(
    ("budget", "spend"),
    [
        (0.5, None),  # below the cheapest points together (0 + 1)
        (1.0, [0.0, 1.0]),
        (2.0, [1.0, 1.0]),  # A's first segment is the steepest
        (5.0, [2.0, 3.0]),  # then B's first (1.5)
        (6.0, [3.0, 3.0]),  # then A's second (0.5)
        (100.0, [6.0, 7.0]),  # every segment bought
    ],
)
def test_the_budget_goes_to_the_steepest_segments_first(
    budget: float, spend: list[float] | None
) -> None:
    assert allocate([HULL_A, HULL_B], budget) == spend


def test_the_allocation_is_the_best_split_of_the_budget() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        hulls = [random_concave_hull(rng) for _ in range(2)]
        budget = float(rng.uniform(hulls[0][0][0] + hulls[1][0][0], 12.0))
        spend = allocate(hulls, budget)
        assert spend is not None and sum(spend) <= budget + 1e-9
        greedy = sum(hull_accuracy(h, s) for h, s in zip(hulls, spend, strict=True))
        grid = np.linspace(hulls[0][0][0], budget - hulls[1][0][0], 2001)
        best = max(hull_accuracy(hulls[0], x) + hull_accuracy(hulls[1], budget - x) for x in grid)
        assert greedy >= best - 1e-9
        assert greedy <= best + 0.01  # the grid is fine enough to come close


def random_concave_hull(rng: np.random.Generator) -> list[tuple[float, float]]:
    widths = rng.uniform(0.2, 3.0, 4)
    slopes = np.sort(rng.uniform(0.05, 3.0, 4))[::-1]
    costs = np.concatenate([[rng.uniform(0, 1)], widths]).cumsum()
    values = np.concatenate([[0.0], widths * slopes]).cumsum()
    return [(float(c), float(v)) for c, v in zip(costs, values, strict=True)]


def test_a_mix_sends_a_share_of_the_task_to_each_neighbouring_rule() -> None:
    low, mid, high = Rule((0,)), Rule((1,)), Rule((2,))
    assert mix_at(HULL_A, [low, mid, high], 3.0) == [(0.75, mid), (0.25, high)]
    assert mix_at(HULL_A, [low, mid, high], 2.0) == [(1.0, mid)]
    assert mix_at(HULL_A, [low, mid, high], 6.0) == [(1.0, high)]


def test_the_bound_is_the_allocations_correct_answers_over_every_row() -> None:
    rules = [Rule((0,)), Rule((1,)), Rule((2,))]
    hulls = [TaskHull("a", 10, 6.0, HULL_A, rules), TaskHull("b", 10, 6.0, HULL_B, rules)]
    level = bound_at(0.5, hulls, 12.0)  # budget 6: spend 3 on A (4.5 right), 3 on B (4)
    assert level.accuracy == pytest.approx(8.5 / 20)
    assert level.spent_share == pytest.approx(0.5)
    assert level.mixes["a"] == [(0.75, rules[1]), (0.25, rules[2])]
    assert bound_at(0.01, hulls, 12.0).accuracy is None


def test_incomplete_rows_are_dropped_and_the_dearest_model_is_the_dearest_on_average() -> None:
    table = tiny_table()
    scores = table.scores.copy()
    scores[3, C] = np.nan
    costs = table.costs.copy()
    costs[:, B] = 10.0  # now B, not E, costs most on average
    changed = OutcomeTable(**{**table.__dict__, "scores": scores, "costs": costs})
    bound = run(changed, [1.0], k=2)
    assert (bound.rows_used, bound.rows_dropped, bound.responses_missing) == (3, 1, 1)
    assert bound.dearest == B
    assert bound.dearest_accuracy == pytest.approx(2 / 3)


def test_no_rule_alone_beats_the_bound_on_the_shipped_sample() -> None:
    table = load_routerbench(shipped_sample_path())
    bound = run(table, [0.35], k=3)
    used = table.take(complete_rows(table))
    assert bound.rows_used == len(used) and bound.rows_dropped == len(table) - len(used) > 0
    rows = task_rows(used)
    dearest_total = float(used.costs[:, bound.dearest].sum())
    for rule in candidate_rules(len(used.models), bound.probes):
        figures = [rule_result(rule, task) for task in rows.values()]
        share = sum(cost for cost, _ in figures) / dearest_total
        accuracy = sum(correct for _, correct in figures) / len(used)
        level = bound_at(share, bound.hulls, dearest_total)
        assert level.accuracy is not None and accuracy <= level.accuracy + 1e-12


def test_the_bound_grows_with_the_budget_and_reaches_the_dearest_model() -> None:
    levels = run(load_routerbench(shipped_sample_path()), [0.1, 0.35, 0.75, 1.0], k=4).levels
    accuracies = [level.accuracy for level in levels if level.accuracy is not None]
    assert len(accuracies) == len(levels) and accuracies == sorted(accuracies)


def test_the_dearest_model_alone_is_within_the_bound_at_its_cost() -> None:
    bound = run(load_routerbench(shipped_sample_path()), [1.0], k=4)
    assert bound.levels[0].accuracy is not None
    assert bound.levels[0].accuracy >= bound.dearest_accuracy


def test_the_command_prints_the_bound_per_share_and_refuses_a_bad_share() -> None:
    result = CliRunner().invoke(main, ["bench", "agreement", "--cost-shares", "0.35,1"])
    assert result.exit_code == 0, result.output
    assert "IN-SAMPLE UPPER BOUND" in result.output
    rows = [line.split() for line in result.output.splitlines() if line.startswith(" 0.35")]
    rows += [line.split() for line in result.output.splitlines() if line.startswith(" 1.00")]
    assert [row[0] for row in rows] == ["0.35", "1.00"]
    assert all(0.0 < float(row[1]) <= 1.0 for row in rows)
    bad = CliRunner().invoke(main, ["bench", "agreement", "--cost-shares", "half"])
    assert bad.exit_code != 0
    assert "'half' is not a comma-separated list of floats" in bad.output
