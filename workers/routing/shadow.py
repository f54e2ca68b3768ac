"""Shadow answers: a second model answers some queries, only to learn from.

With an empty store the router learns only from judged answers, and a judge
scoring a fifth of them gives too few labels to tell the models apart on each
kind of query. A shadow answer is a second model's answer to a query that is
answered by another: it is always judged, never delivered, and its cost comes
out of the window's budget, reserved before the window's answers are planned
again, so the window still keeps its budget.

What it may spend (budget mode): ROUTER_SHADOW_SHARE of the window's budget,
or what the window's plan leaves unspent if that is more. With few outcomes
the plan rarely finds a dear model worth its price (its prediction rests on
the priors and the few cheap models judged so far) and leaves most of the
budget unspent, so the dear model is never tried and never learnt: the money
left over buys the labels that could change that. In quality mode: the share
of the plan's spend.

Which pairs: only models that might be better than the query's answer (a
draw from the router's Beta belief about the pair, the one exploration.py
draws from, beats the answer's prediction: a label that cannot change the
routing is not worth buying, so a model known to be worse is never shadowed
and a confident router spends nothing beyond its share); among them the labels
worth most per dollar: a pair's label is worth the improvement over the
answer it may reveal, E[max(q - q_answer, 0)] under that belief (large where
the model might be much better: a wide belief near or above the answer; near
0 where it is known worse), and costs the model's predicted cost there.
Worth read as the belief's spread alone bought labels of cheap models known
to be a little worse, one shadow per query, and left the dear model untried
while the plan spent a quarter of its budget (`omnirouter bench
cold-start-replay`, 64 seeds: the last block 0.75 points closer to the
warm-started router with the improvement, s.e. 0.33; docs/history-cold-start.md).
One shadow per query at most, never the model answering it, never a model the
query's hints do not allow, and never beyond a model's capacity.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.stats import norm

from workers.routing.optimizer import WindowProblem
from workers.routing.room import NONE, WindowRoom

NOT_SHADOWED = NONE
# A free pair's cost, for the worth-per-dollar ratio (a price of 0 is not infinitely good).
MIN_COST_USD = 1e-9
# A belief's least spread (a quality of exactly 0 or 1 has none: no division by it).
MIN_SPREAD = 1e-9


def belief_spread(
    quality: NDArray[np.float64], support: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Standard deviation of each pair's Beta belief, Beta(q (n + 2), (1 - q)(n + 2))."""
    q = np.clip(quality, 0.0, 1.0)
    strength = np.maximum(support, 0.0) + 2.0
    return np.sqrt(q * (1 - q) / (strength + 1.0))


def label_worth(
    quality: NDArray[np.float64],
    support: NDArray[np.float64],
    cost: NDArray[np.float64],
    answer_quality: NDArray[np.float64],
) -> NDArray[np.float64]:
    """What one more label of each pair is worth per dollar: the improvement over
    the query's answer (predicted `answer_quality`, one per query) it may reveal,
    E[max(q - q_answer, 0)] with q normal of the pair's Beta belief's mean and spread."""
    spread = np.maximum(belief_spread(quality, support), MIN_SPREAD)
    margin = quality - answer_quality[:, None]
    z = margin / spread
    improvement = margin * norm.cdf(z) + spread * norm.pdf(z)
    return improvement / np.maximum(cost, MIN_COST_USD)


def choose_shadows(
    problem: WindowProblem,
    answered: NDArray[np.int64],
    support: NDArray[np.float64],
    allowance_usd: float,
    allowed: NDArray[np.bool_] | None = None,
    draws: NDArray[np.float64] | None = None,
    fixed: NDArray[np.int64] | None = None,
) -> NDArray[np.int64]:
    """For each query the model to shadow it, or NOT_SHADOWED: the pairs whose label
    is worth most per dollar first, as long as the allowance lasts and the rest of
    the window (all but the `fixed`, explored, queries) can still be planned
    within the budget, target and capacities the shadows leave; with `draws` (one
    belief draw per pair), only pairs whose draw beats the answer's prediction."""
    n, m = problem.quality.shape
    chosen = np.full(n, NOT_SHADOWED, dtype=np.int64)
    if m == 1 or allowance_usd <= 0:
        return chosen
    rows = np.arange(n)
    candidates = problem.permitted_within(allowed)
    candidates[rows, answered] = False
    answer_quality = problem.quality[rows, answered]
    if draws is not None:  # only models that might be better than the answer's
        candidates &= draws > answer_quality[:, None]
    cost = problem.cost
    worth = np.where(
        candidates, label_worth(problem.quality, support, cost, answer_quality), -np.inf
    )
    room = WindowRoom(problem, fixed)
    # Only slots the answers leave free: a shadow in an answer's slot would push that
    # answer to a dearer or worse model when the rest is planned again.
    free = problem.capacity_array - np.bincount(answered, minlength=m)
    spent = 0.0
    for flat in np.argsort(-worth, axis=None, kind="stable"):
        i, j = divmod(int(flat), m)
        if not np.isfinite(worth[i, j]):
            break
        if chosen[i] != NOT_SHADOWED or spent + cost[i, j] > allowance_usd or free[j] < 1:
            continue
        if not room.take(i, j, shadow=True):
            continue
        chosen[i] = j
        free[j] -= 1
        spent += float(cost[i, j])
    return chosen


def shadow_spend(problem: WindowProblem, shadows: NDArray[np.int64]) -> float:
    rows = np.flatnonzero(shadows != NOT_SHADOWED)
    return float(problem.cost[rows, shadows[rows]].sum())
