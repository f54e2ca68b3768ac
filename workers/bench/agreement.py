"""`omnirouter bench agreement`: the most accuracy answer agreement can buy.

An IN-SAMPLE UPPER BOUND, not a router: every rule and every mix below is chosen
knowing each row's outcome, so a real cascade, which must decide before it sees
the outcomes, should not exceed these figures. If a target lies above the bound,
no agreement rule of these kinds reaches it at task granularity; what would is a
signal that ranks answers *within* agreeing probes.

Rules, scored on each task's rows (every row must hold every model's score and
cost; the others are dropped and counted; a missing response is an empty answer):
- a single model;
- a pair of probes (an ordered pair among the k cheapest models by mean cost):
  when their final answers (answer_scorer.final_answer) agree, accept the first
  probe's answer, else ask a fallback model (any model but the probes) or keep
  the first probe's answer. An empty final answer agrees with nothing;
- sequential majority: a pair of probes, and when they disagree a third model
  (any other); accept the probe answer the third agrees with, else the fallback.

Per task, the upper concave hull of (cost, correct answers) over the rules is
what that task can buy at each cost (sending a share of its queries to one rule
and the rest to the next reaches any point between them). A budget, a share of
the dearest model's (highest mean cost) total cost, is spread across tasks by
the hulls' slopes, steepest first: for concave piecewise-linear returns this
greedy allocation is optimal.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from workers.routing.answer_scorer import final_answer
from workers.routing.cascade import cheapest_models
from workers.routing.dataset import OutcomeTable
from workers.routing.evaluate import hull_accuracy, upper_hull

# Probes are drawn from this many of the cheapest models (by mean cost).
DEFAULT_PROBES = 6
KEEP_FIRST = -1  # a fallback meaning: keep the first probe's answer, ask no one

Point = tuple[float, float]  # (cost USD, correct answers)


@dataclass(frozen=True)
class Rule:
    """A deterministic rule over recorded answers: one probe answers alone; two are a
    pair that must agree; a third is asked when the pair disagrees (a majority)."""

    probes: tuple[int, ...]
    fallback: int = KEEP_FIRST  # asked when no answer is agreed on

    def describe(self, names: Sequence[str]) -> str:
        if len(self.probes) == 1:
            return names[self.probes[0]]
        first, second = (names[j] for j in self.probes[:2])
        text = f"{first}+{second} agree"
        if len(self.probes) == 3:
            text += f", else {names[self.probes[2]]} votes"
        if self.fallback == KEEP_FIRST:
            return f"{text}, else keep {first}"
        return f"{text}, else {names[self.fallback]}"


@dataclass(frozen=True)
class TaskRows:
    """One task's rows: scores and costs (n, models), and which models' final
    answers agree on each row (n, models, models)."""

    scores: NDArray[np.float64]
    costs: NDArray[np.float64]
    agree: NDArray[np.bool_]


@dataclass(frozen=True)
class TaskHull:
    task: str
    rows: int
    dearest_cost: float  # the dearest model's cost on this task's rows
    points: list[Point]  # the hull, by cost
    rules: list[Rule]  # the rule at each point


@dataclass(frozen=True)
class BoundAtShare:
    share: float  # of the dearest model's total cost
    accuracy: float | None  # None: the budget is below the tasks' cheapest rules together
    spent_share: float
    mixes: dict[str, list[tuple[float, Rule]]]  # per task: (share of its queries, rule)


@dataclass(frozen=True)
class AgreementBound:
    models: list[str]
    rows_used: int
    rows_dropped: int  # a score or cost missing for some model
    responses_missing: int  # counted as empty answers
    dearest: int
    dearest_accuracy: float
    probes: list[int]  # the candidate probes, cheapest first
    rules: int  # rules scored per task
    hulls: list[TaskHull]
    levels: list[BoundAtShare]


# ------------------------------------------------------------------------ rules


def answer_codes(finals: Sequence[Sequence[str]]) -> NDArray[np.int64]:
    """(n, models): equal non-empty final answers of a row share a code; an empty
    answer gets a code of its own, so it agrees with nothing."""
    codes = np.zeros((len(finals), len(finals[0]) if finals else 0), dtype=np.int64)
    for i, row in enumerate(finals):
        seen: dict[str, int] = {}
        for j, answer in enumerate(row):
            codes[i, j] = seen.setdefault(answer, len(seen)) if answer else -1 - j
    return codes


def agreement_matrix(finals: Sequence[Sequence[str]]) -> NDArray[np.bool_]:
    """(n, models, models): whether two models' final answers agree on each row."""
    codes = answer_codes(finals)
    return np.asarray(codes[:, :, None] == codes[:, None, :])


def play(rule: Rule, agree: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Per row, the model whose answer is final, and which models were asked."""
    n, n_models = agree.shape[:2]
    first = rule.probes[0]
    final = np.full(n, first, dtype=np.int64)
    asked = np.zeros((n, n_models), dtype=bool)
    asked[:, list(rule.probes[:2])] = True
    if len(rule.probes) == 1:
        return final, asked
    second = rule.probes[1]
    undecided = ~agree[:, first, second]
    if len(rule.probes) == 3:
        third = rule.probes[2]
        asked[undecided, third] = True
        # The pair disagrees, so the third can agree with one of them at most.
        final[undecided & agree[:, third, second]] = second
        undecided &= ~agree[:, third, first] & ~agree[:, third, second]
    if rule.fallback != KEEP_FIRST:
        asked[undecided, rule.fallback] = True
        final[undecided] = rule.fallback
    return final, asked


def rule_result(rule: Rule, rows: TaskRows) -> Point:
    """(cost USD, correct answers) of a rule on a task's rows."""
    final, asked = play(rule, rows.agree)
    correct = rows.scores[np.arange(len(final)), final].sum()
    return float((rows.costs * asked).sum()), float(correct)


def candidate_rules(n_models: int, probes: Sequence[int]) -> list[Rule]:
    """Single models, then pairs, then majorities (simpler rules first, so a tie in
    cost and accuracy keeps the simpler one)."""
    singles = [Rule((j,)) for j in range(n_models)]
    pairs, majorities = [], []
    for first, second in itertools.permutations(probes, 2):
        others = [j for j in range(n_models) if j not in (first, second)]
        pairs += [Rule((first, second), f) for f in (KEEP_FIRST, *others)]
        for third in others:
            fallbacks = (KEEP_FIRST, *(j for j in others if j != third))
            majorities += [Rule((first, second, third), f) for f in fallbacks]
    return singles + pairs + majorities


# ------------------------------------------------------------------------ hulls


def rules_hull(results: Sequence[tuple[Point, Rule]]) -> tuple[list[Point], list[Rule]]:
    """The upper concave hull of the rules' (cost, correct) points and the rule at
    each vertex (the first given, among rules with the same figures)."""
    # The best rule of each cost, to name the hull's vertices.
    best: dict[float, tuple[float, Rule]] = {}
    for (cost, correct), rule in results:
        if cost not in best or correct > best[cost][0]:
            best[cost] = (correct, rule)
    points = upper_hull([(cost, correct) for cost, (correct, _) in best.items()])
    return points, [best[cost][1] for cost, _ in points]


def task_hull(task: str, rows: TaskRows, rules: Sequence[Rule], dearest: int) -> TaskHull:
    points, chosen = rules_hull([(rule_result(rule, rows), rule) for rule in rules])
    dearest_cost = float(rows.costs[:, dearest].sum())
    return TaskHull(task, len(rows.scores), dearest_cost, points, chosen)


# ------------------------------------------------------------------------ budget


def allocate(hulls: Sequence[Sequence[Point]], budget: float) -> list[float] | None:
    """The spend on each hull that buys most in total within `budget`: every hull
    starts at its cheapest point, then segments are bought steepest first (the last
    one in part). None when the cheapest points alone exceed the budget."""
    spend = [hull[0][0] for hull in hulls]
    left = budget - sum(spend)
    if left < 0:
        return None
    segments = [
        ((v1 - v0) / (c1 - c0), index, c1 - c0)
        for index, hull in enumerate(hulls)
        for (c0, v0), (c1, v1) in itertools.pairwise(hull)
    ]
    for _, index, width in sorted(segments, key=lambda s: -s[0]):
        bought = min(width, left)
        spend[index] += bought
        left -= bought
        if left <= 0:
            break
    return spend


def mix_at(
    points: Sequence[Point], rules: Sequence[Rule], spend: float
) -> list[tuple[float, Rule]]:
    """The rules whose mix sits at `spend` on a hull: (share of the task's queries, rule)."""
    for (c0, _), (c1, _), low, high in zip(points, points[1:], rules, rules[1:], strict=False):
        if c0 <= spend < c1:
            upper = (spend - c0) / (c1 - c0)
            return [(1 - upper, low)] if upper == 0 else [(1 - upper, low), (upper, high)]
    return [(1.0, rules[-1])]


def bound_at(share: float, hulls: Sequence[TaskHull], dearest_total: float) -> BoundAtShare:
    spend = allocate([h.points for h in hulls], share * dearest_total)
    if spend is None:
        return BoundAtShare(share, None, 0.0, {})
    correct = sum(hull_accuracy(h.points, s) for h, s in zip(hulls, spend, strict=True))
    rows = sum(h.rows for h in hulls)
    mixes = {h.task: mix_at(h.points, h.rules, s) for h, s in zip(hulls, spend, strict=True)}
    return BoundAtShare(share, correct / rows, sum(spend) / dearest_total, mixes)


# ------------------------------------------------------------------------ run


def complete_rows(table: OutcomeTable) -> NDArray[np.int64]:
    """Rows whose every model has a score and a cost."""
    known = ~np.isnan(table.scores).any(axis=1) & ~np.isnan(table.costs).any(axis=1)
    return np.flatnonzero(known)


def task_rows(table: OutcomeTable) -> dict[str, TaskRows]:
    finals = [[final_answer(row[m]) for m in table.models] for row in table.responses]
    agree = agreement_matrix(finals)
    tasks = np.asarray(table.eval_names)
    return {
        task: TaskRows(
            table.scores[tasks == task], table.costs[tasks == task], agree[tasks == task]
        )
        for task in sorted(set(table.eval_names))
    }


def run(table: OutcomeTable, shares: Sequence[float], k: int = DEFAULT_PROBES) -> AgreementBound:
    """The in-sample bound at each share of the dearest model's cost."""
    used = table.take(complete_rows(table))
    if not len(used):
        raise ValueError("no row has every model's score and cost")
    dearest = int(used.costs.mean(axis=0).argmax())
    probes = cheapest_models(used.costs, k)
    rules = candidate_rules(len(used.models), probes)
    hulls = [task_hull(t, rows, rules, dearest) for t, rows in task_rows(used).items()]
    dearest_total = float(used.costs[:, dearest].sum())
    return AgreementBound(
        models=used.models,
        rows_used=len(used),
        rows_dropped=len(table) - len(used),
        responses_missing=sum(r[m] is None for r in used.responses for m in used.models),
        dearest=dearest,
        dearest_accuracy=float(used.scores[:, dearest].mean()),
        probes=probes,
        rules=len(rules),
        hulls=hulls,
        levels=[bound_at(share, hulls, dearest_total) for share in shares],
    )


def short_names(models: Sequence[str]) -> list[str]:
    """Model names without their organisation prefix where that stays unambiguous."""
    short = [m.rsplit("/", 1)[-1] for m in models]
    return [s if short.count(s) == 1 else m for s, m in zip(short, models, strict=True)]


def report_lines(bound: AgreementBound) -> list[str]:
    """What `omnirouter bench agreement` prints: the bound at each share with each
    task's mix, then each task's hull."""
    names = short_names(bound.models)
    lines = [
        "IN-SAMPLE UPPER BOUND: rules and per-task mixes chosen knowing every outcome; "
        "a real cascade should not exceed it",
        f"rows: {bound.rows_used} used, {bound.rows_dropped} dropped (a model's score or cost "
        f"missing); {bound.responses_missing} missing responses count as empty answers",
        f"dearest model (highest mean cost): {names[bound.dearest]}, "
        f"accuracy {bound.dearest_accuracy:.4f}",
        f"probes from the {len(bound.probes)} cheapest: "
        + ", ".join(names[j] for j in bound.probes),
        f"rules per task: {bound.rules}",
        f"{'share':>5} {'bound':>7} {'spent':>6}  mix per task (share of its queries)",
    ]
    for level in bound.levels:
        accuracy = "-" if level.accuracy is None else f"{level.accuracy:.4f}"
        lines.append(f"{level.share:5.2f} {accuracy:>7} {level.spent_share:6.1%}")
        for task, mix in level.mixes.items():
            parts = " | ".join(f"{part:.2f} {rule.describe(names)}" for part, rule in mix)
            lines.append(f"      {task}: {parts}")
    lines.append(
        "hull per task: cost as a share of the dearest model's on the task, accuracy, rule"
    )
    for hull in bound.hulls:
        lines.append(f"  {hull.task} ({hull.rows} rows)")
        for (cost, correct), rule in zip(hull.points, hull.rules, strict=True):
            share = cost / hull.dearest_cost
            lines.append(f"    {share:6.3f} {correct / hull.rows:.4f}  {rule.describe(names)}")
    return lines
