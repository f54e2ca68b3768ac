"""The answer scorer: how likely each model is to answer well, once cheap probe models
have answered a query.

The one-shot predictor reads only the query and tells tasks apart, little more
(within-task AUC about 0.55). What separates right from wrong answers within a
task is in the answers: whether independent cheap models agree. The scorer reads
the probes' answers and estimates, for every model of the pool, P(good answer):
for a probe model, that its answer already in hand is good; for any other, that
escalating to it would be (probes that disagree mark a query hard for everyone).

Features, general to any task (no rule per dataset):
- agreement between the probes' final answers (last non-empty line, case, spaces
  and punctuation normalised), and the token Jaccard similarity of their whole
  responses (free text or code, where final lines rarely match);
- whether the final answers are short (a choice, a number) or long (prose, code);
- the model's predicted quality from the one-shot predictor;
- the query's cluster (workers/routing/clusters.py), alone and crossed with the
  agreement features: agreement means more on some kinds of query than others.

One logistic regression per model, then Platt-calibrated on its own out-of-fold
logits (held-out outcomes), so the probabilities can price an escalation.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression

# Final answers of at most this many words count as short (a letter, a number, a name).
SHORT_ANSWER_WORDS = 3
# Fewer known outcomes of either class than this: a model's posterior is its mean.
MIN_OUTCOMES_PER_CLASS = 5
# Predicted qualities are clipped away from 0 and 1 before their logit is taken.
LOGIT_EPSILON = 0.01
# Folds of the out-of-fold logits each head is Platt-calibrated on.
SCORER_FOLDS = 3

_WORD = re.compile(r"\w+")
_NOT_WORD = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


def response_text(response: str | None) -> str:
    """A response as text. Some APIs and recorded sets keep a response as the list of
    its choices (`"['C']"`): a list of strings is joined, anything else kept."""
    if response is None:
        return ""
    stripped = response.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            value = ast.literal_eval(stripped)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return response
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
    return response


def final_answer(response: str | None) -> str:
    """The last non-empty line, lower-cased, without punctuation, spaces collapsed:
    "C)" and "c" are the same answer."""
    lines = [line for line in response_text(response).splitlines() if line.strip()]
    if not lines:
        return ""
    return _SPACES.sub(" ", _NOT_WORD.sub(" ", lines[-1].lower())).strip()


def answer_tokens(response: str | None) -> frozenset[str]:
    return frozenset(_WORD.findall(response_text(response).lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 0.0


@dataclass(frozen=True)
class ProbeAnswers:
    """What the probe models answered to each query: their normalised final answers
    and token sets, (n_queries, n_probes) each."""

    finals: list[list[str]]
    tokens: list[list[frozenset[str]]]

    @classmethod
    def of(cls, responses: Sequence[Sequence[str | None]]) -> ProbeAnswers:
        return cls(
            [[final_answer(r) for r in row] for row in responses],
            [[answer_tokens(r) for r in row] for row in responses],
        )

    def __len__(self) -> int:
        return len(self.finals)


def agreement(answers: ProbeAnswers) -> NDArray[np.float64]:
    """(n_queries, n_probes, 2): for each probe, the share of the other probes whose
    final answer equals its own (an empty answer agrees with nothing), and its mean
    token Jaccard with them. Zero with a single probe."""
    n = len(answers)
    n_probes = len(answers.finals[0]) if n else 0
    out = np.zeros((n, n_probes, 2))
    if n_probes < 2:
        return out
    for i in range(n):
        finals, tokens = answers.finals[i], answers.tokens[i]
        for k in range(n_probes):
            others = [o for o in range(n_probes) if o != k]
            same = [bool(finals[k]) and finals[k] == finals[o] for o in others]
            out[i, k, 0] = np.mean(same)
            out[i, k, 1] = np.mean([jaccard(tokens[k], tokens[o]) for o in others])
    return out


def logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
    clipped = np.clip(p, LOGIT_EPSILON, 1 - LOGIT_EPSILON)
    return np.asarray(np.log(clipped / (1 - clipped)), dtype=np.float64)


def features(
    answers: ProbeAnswers,
    panel: Sequence[int],
    predicted: NDArray[np.float64],
    clusters: NDArray[np.int64],
    n_clusters: int,
    model: int,
) -> NDArray[np.float64]:
    """The feature rows for `model`'s posterior. For a probe model its own answer's
    agreement with the others; for any other model the strongest agreement among the
    probes (a majority's strength)."""
    agree = agreement(answers)
    if model in panel:
        own = agree[:, list(panel).index(model), :]
    else:
        own = agree.max(axis=1) if agree.shape[1] else np.zeros((len(answers), 2))
    mean_agree = agree.mean(axis=1) if agree.shape[1] else np.zeros((len(answers), 2))
    short = np.array(
        [np.mean([len(f.split()) <= SHORT_ANSWER_WORDS for f in row]) for row in answers.finals]
    )
    onehot = np.eye(n_clusters)[np.clip(clusters, 0, n_clusters - 1)]
    columns = [
        logit(predicted[:, model])[:, None],
        own,
        mean_agree,
        short[:, None],
        (short * mean_agree[:, 0])[:, None],
        onehot,
        onehot * mean_agree[:, :1],
        onehot * mean_agree[:, 1:],
    ]
    return np.hstack(columns)


class _Head:
    """P(good) of one model: a logistic regression Platt-scaled on held-out logits,
    or a constant when its outcomes are too few or all alike."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.constant: float | None = None
        self.regression: LogisticRegression | None = None
        self.platt = (1.0, 0.0)
        # Calibrated P(good) of each training row from a regression that did not see it.
        self.held_out = np.zeros(0)

    def fit(self, x: NDArray[np.float64], y: NDArray[np.float64]) -> _Head:
        good = float(y.sum())
        if min(good, len(y) - good) < MIN_OUTCOMES_PER_CLASS:
            self.constant = (good + 1.0) / (len(y) + 2.0)
            self.held_out = np.full(len(y), self.constant)
            return self
        held_out = out_of_fold_logits(x, y, self.seed)
        calibration = LogisticRegression(C=1e4, max_iter=1000).fit(held_out[:, None], y)
        self.platt = (float(calibration.coef_[0, 0]), float(calibration.intercept_[0]))
        self.held_out = self._calibrated(held_out)
        self.regression = _regression().fit(x, y)
        return self

    def _calibrated(self, logits: NDArray[np.float64]) -> NDArray[np.float64]:
        slope, intercept = self.platt
        return np.asarray(1.0 / (1.0 + np.exp(-(slope * logits + intercept))), dtype=np.float64)

    def predict(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        if self.regression is None:
            return np.full(len(x), self.constant if self.constant is not None else 0.5)
        return self._calibrated(self.regression.decision_function(x))


def _regression() -> LogisticRegression:
    return LogisticRegression(C=1.0, max_iter=2000)


def fold_numbers(n: int, folds: int, seed: int) -> NDArray[np.int64]:
    return np.random.default_rng(seed).permutation(n).astype(np.int64) % folds


def out_of_fold_logits(
    x: NDArray[np.float64], y: NDArray[np.float64], seed: int
) -> NDArray[np.float64]:
    """Each row's logit from a regression that did not see it."""
    fold = fold_numbers(len(y), SCORER_FOLDS, seed)
    logits = np.zeros(len(y))
    for f in range(SCORER_FOLDS):
        train, test = fold != f, fold == f
        if len(set(y[train].tolist())) < 2 or not test.any():
            logits[test] = 0.0
            continue
        logits[test] = _regression().fit(x[train], y[train]).decision_function(x[test])
    return logits


class AnswerScorer:
    """P(each model answers well | the probes' answers), for every model of a pool."""

    def __init__(self, panel: Sequence[int], n_models: int, n_clusters: int, seed: int = 0):
        self.panel = list(panel)
        self.n_models = n_models
        self.n_clusters = max(1, n_clusters)
        self.seed = seed
        self.heads: list[_Head] = []
        # After `fit`: each training row's calibrated posterior from heads that did not
        # see it (NaN where the outcome is unknown or the model was not fitted).
        self.held_out = np.zeros((0, n_models))

    def fit(
        self,
        answers: ProbeAnswers,
        predicted: NDArray[np.float64],
        clusters: NDArray[np.int64],
        truth: NDArray[np.float64],
        models: Sequence[int] | None = None,
    ) -> AnswerScorer:
        """Fit on stored outcomes: `truth` (n_queries, n_models), 1/0 (scores in
        between count as good at 0.5 and above), NaN unknown. `models` limits the
        fit to some models (the others predict 0.5)."""
        wanted = range(self.n_models) if models is None else models
        self.heads = [_Head(self.seed) for _ in range(self.n_models)]
        self.held_out = np.full(truth.shape, np.nan)
        for j in wanted:
            known = ~np.isnan(truth[:, j])
            x = self._features(answers, predicted, clusters, j)
            self.heads[j].fit(x[known], (truth[known, j] >= 0.5).astype(float))
            self.held_out[known, j] = self.heads[j].held_out
        return self

    def posterior(
        self, answers: ProbeAnswers, predicted: NDArray[np.float64], clusters: NDArray[np.int64]
    ) -> NDArray[np.float64]:
        """(n_queries, n_models): P(good) of each model given the probes' answers."""
        if not len(answers):
            return np.zeros((0, self.n_models))
        return np.column_stack(
            [
                head.predict(self._features(answers, predicted, clusters, j))
                for j, head in enumerate(self.heads)
            ]
        )

    def _features(
        self,
        answers: ProbeAnswers,
        predicted: NDArray[np.float64],
        clusters: NDArray[np.int64],
        model: int,
    ) -> NDArray[np.float64]:
        return features(answers, self.panel, predicted, clusters, self.n_clusters, model)


def best_probe(posterior: NDArray[np.float64], panel: Sequence[int]) -> NDArray[np.int64]:
    """Per query, the probe model whose answer is most likely good (the one to accept)."""
    return np.asarray(panel, dtype=np.int64)[posterior[:, list(panel)].argmax(axis=1)]
