"""The hybrid predictor: each model's quality and cost on each query of a batch.

Two parts, blended with a weight chosen on held-out outcomes:
- retrieval: the k nearest past queries (FAISS), similarity-weighted, shrunk
  towards a prior by `prior_strength` outcomes' worth, so a model with few or
  no outcomes near a query is predicted by its prior, and a missing score
  counts for nothing (unknown, not 0). The prior is the model's mean on the
  query's cluster of stored queries as far as the model's outcomes are sparse
  (workers/routing/clusters.py), its mean over the store as far as every
  stored query has one; that mean is itself shrunk towards what the user stated
  (ROUTER_MODEL_PRIORS) or, where silent, towards what the store says of
  models of its price (one shared value while nothing is known): with nothing
  stored, routing follows the user's priors and the prices, and a model
  nobody has tried yet is expected to be as good as tried models of its price;
- trained: one logistic-regression head per model on the query vector,
  refitted on the stored outcomes.

Each prediction comes with its support: how many stored outcomes' worth it
rests on (0: the stated prior alone). The window stage reads it to say when a
quality target cannot be judged yet, and to explore where it is thin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from workers.config import ModelPrice
from workers.routing.clusters import cluster_means, cluster_totals
from workers.routing.embedder import Embedder
from workers.routing.optimizer import Uncertainty
from workers.routing.store import RetrievalStore

# A common rule of thumb for English text and GPT-style tokenisers.
CHARS_PER_TOKEN = 4.0
# Output length assumed for a priced model that no stored outcome tells about.
DEFAULT_OUTPUT_TOKENS = 256.0
# Below this many known outcomes (of each class) a model's head is its mean, shrunk
# towards the shared prior by STATED_PRIOR_OUTCOMES (the raw mean of three judged
# answers swung a cold start's predictions to 0.08 and 0.96).
MIN_OUTCOMES_PER_CLASS = 5
# Quality believed of a model the user stated nothing about.
SHARED_PRIOR_QUALITY = 0.5
# How many stored outcomes' worth the stated prior counts for in a model's mean.
STATED_PRIOR_OUTCOMES = 5.0
# Prompt length of the typical query a list price is read at (quality_by_price).
TYPICAL_PROMPT_TOKENS = 500.0
# Pulls the slope of quality on log cost towards flat while few models are known.
PRICE_SLOPE_RIDGE = 1.0


@dataclass(frozen=True)
class KnnSettings:
    neighbours: int = 20
    # Softmax temperature over cosine similarity: 0.05 lets a neighbour 0.05
    # less similar than the nearest count e times less.
    temperature: float = 0.05
    # Weight of the model's prior, in neighbours' worth: a few neighbours must agree
    # before a query's prediction leaves its model's mean (with 100 stored prompts,
    # 1.0 lost 4.9 points to the best single model at its cost, 10.0 lost 0.4;
    # cross-validated on 2,225 prompts both give AIQ 0.849).
    prior_strength: float = 10.0


@dataclass(frozen=True)
class Estimates:
    """Predictions for a batch: matrices ready for the optimiser."""

    quality: NDArray[np.float64]  # (n_queries, n_models), P(good answer)
    cost: NDArray[np.float64]  # (n_queries, n_models), USD
    vectors: NDArray[np.float32]  # (n_queries, dimension), for the store later
    support: NDArray[np.float64]  # (n_queries, n_models), stored outcomes' worth behind quality
    # Each query's cluster and the variance of each model's mean there (None: nothing
    # stored yet, the predictions are the priors).
    uncertainty: Uncertainty | None = None


def neighbour_weights(similarities: NDArray[np.float32], temperature: float) -> NDArray[np.float64]:
    """Softmax-style weights of each query's neighbours, the nearest weighing 1."""
    sims = np.asarray(similarities, dtype=np.float64)
    if sims.shape[1] == 0:
        return sims
    return np.exp((sims - sims[:, :1]) / temperature)


def shrunk_mean(
    values: NDArray[np.float64],
    weights: NDArray[np.float64],
    prior: NDArray[np.float64],
    prior_strength: float,
) -> NDArray[np.float64]:
    """Weighted mean over neighbours of every column, ignoring NaN, pulled towards
    `prior` by `prior_strength` neighbours' worth.

    values: (n_queries, k, n_models); weights: (n_queries, k); prior: (n_models,) or
    (n_queries, n_models).
    """
    known = ~np.isnan(values)
    effective = weights[:, :, None] * known
    total = np.where(known, values, 0.0) * effective
    return (total.sum(axis=1) + prior_strength * prior) / (effective.sum(axis=1) + prior_strength)


def column_means(values: NDArray[np.float64], default: float) -> NDArray[np.float64]:
    """Mean of each column over known entries; `default` for a column with none."""
    known = ~np.isnan(values)
    counts = known.sum(axis=0)
    sums = np.where(known, values, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), default)


@dataclass(frozen=True)
class Beliefs:
    """What the user told the router before any outcome: each model's quality
    (ROUTER_MODEL_PRIORS) and what a typical query costs on it at its list price
    (ROUTER_MODEL_PRICES); NaN where the user said nothing."""

    quality: NDArray[np.float64]
    typical_cost: NDArray[np.float64]

    @classmethod
    def of(
        cls,
        models: Sequence[str],
        stated: Mapping[str, float] | None = None,
        prices: Mapping[str, ModelPrice] | None = None,
    ) -> Beliefs:
        stated, prices = stated or {}, prices or {}
        quality = [stated.get(m, math.nan) for m in models]
        typical = [
            p.cost(TYPICAL_PROMPT_TOKENS, DEFAULT_OUTPUT_TOKENS)
            if (p := prices.get(m)) is not None
            else math.nan
            for m in models
        ]
        return cls(np.array(quality, dtype=float), np.array(typical, dtype=float))

    @classmethod
    def none(cls, n_models: int) -> Beliefs:
        return cls(np.full(n_models, math.nan), np.full(n_models, math.nan))

    def key(self) -> str:
        return (self.quality.tobytes() + self.typical_cost.tobytes()).hex()


def quality_by_price(
    means: NDArray[np.float64], weights: NDArray[np.float64], costs: NDArray[np.float64]
) -> NDArray[np.float64]:
    """What the store says of a model's quality from its cost alone: a line of quality
    against log cost through the models it knows (weighted by how much it knows of
    each; the slope shrunk towards flat). Dearer models are often better, but by how
    much, or whether at all, is the store's to say. The shared prior while nothing is
    known; the known models' mean while their costs do not differ."""
    known = (weights > 0) & np.isfinite(costs) & (costs > 0)
    if not known.any():
        return np.full(len(means), SHARED_PRIOR_QUALITY)
    w, y = weights[known], means[known]
    centre = float(np.average(y, weights=w))
    x = np.log(np.where(np.isfinite(costs) & (costs > 0), costs, np.nan))
    x_centre = float(np.average(x[known], weights=w))
    spread = float(np.sum(w * (x[known] - x_centre) ** 2))
    slope = float(np.sum(w * (x[known] - x_centre) * (y - centre))) / (spread + PRICE_SLOPE_RIDGE)
    line = centre + slope * (x - x_centre)
    return np.clip(np.where(np.isfinite(line), line, centre), 0.02, 0.98)


@dataclass(frozen=True)
class Priors:
    """What is predicted of each model where the neighbours know nothing."""

    quality: NDArray[np.float64]  # mean score, shrunk towards the stated prior
    weight: NDArray[np.float64]  # in [0, 1): how far quality rests on stored outcomes
    cost: NDArray[np.float64]
    output_tokens: NDArray[np.float64]


def priors(store: RetrievalStore, beliefs: Beliefs) -> Priors:
    """Each model's mean quality over the store, shrunk by STATED_PRIOR_OUTCOMES
    towards what the user stated or, where silent, towards what the store says of
    models of its cost (`quality_by_price`); its mean cost and output tokens. An
    unobserved cost is the mean of all observed costs, or while none is observed
    the mean typical cost of the priced models (never 0, which would draw all
    traffic to the unknown)."""
    known = ~np.isnan(store.scores)
    counts = known.sum(axis=0)
    means = np.where(known, store.scores, 0.0).sum(axis=0) / np.maximum(counts, 1)
    weight = counts / (counts + STATED_PRIOR_OUTCOMES)
    observed_cost = column_means(store.costs, default=math.nan)
    typical_cost = np.where(np.isnan(beliefs.typical_cost), observed_cost, beliefs.typical_cost)
    stated = np.where(
        np.isnan(beliefs.quality), quality_by_price(means, weight, typical_cost), beliefs.quality
    )
    overall_cost = _overall_cost(store.costs, beliefs.typical_cost)
    return Priors(
        quality=weight * means + (1 - weight) * stated,
        weight=weight,
        cost=np.where(np.isnan(observed_cost), overall_cost, observed_cost),
        output_tokens=column_means(store.output_tokens, default=DEFAULT_OUTPUT_TOKENS),
    )


def _overall_cost(costs: NDArray[np.float64], typical_cost: NDArray[np.float64]) -> float:
    """What a query costs on a model of unknown cost: the mean observed cost, else the
    priced models' mean typical cost, else 0 (nothing is priced or observed: every
    model costs the same)."""
    for known in (costs, typical_cost):
        if np.isfinite(known).any():
            return float(np.nanmean(known))
    return 0.0


# How many outcomes' worth a model's mean counts for beside its outcomes in a cluster.
CLUSTER_PRIOR_OUTCOMES = 20.0
# A store of fewer queries than this is small: its neighbours are few and far, so a
# query's prediction is shrunk towards the model's mean on its cluster even where
# every stored query has the model's outcome; beyond it that weight fades as
# SMALL_STORE_QUERIES / queries stored. With 100 stored prompts, shrinking towards
# the model's overall mean put a model good at most tasks on the one it fails
# (0.74 predicted, 0.37 real) and lost 2.3 points to the best single model at its cost.
SMALL_STORE_QUERIES = 400.0


def cluster_weight(scores: NDArray[np.float64]) -> NDArray[np.float64]:
    """How far each model's prior is its mean on the query's cluster rather than its
    overall mean: as far as its outcomes are sparse in the store, or the store small."""
    if len(scores) == 0:
        return np.ones(scores.shape[1] if scores.ndim == 2 else 1)
    sparsity = 1.0 - (~np.isnan(scores)).mean(axis=0)
    return np.maximum(sparsity, min(1.0, SMALL_STORE_QUERIES / len(scores)))


def cluster_priors(
    store: RetrievalStore, vectors: NDArray[np.float32], prior: Priors, key: str
) -> NDArray[np.float64]:
    """For each query and model, what to expect where the neighbours say nothing: the
    mean score in the query's cluster (shrunk towards the model's prior) as far as
    `cluster_weight` says, else the model's prior (in a large store where every
    stored query has the model's outcome, the neighbours hold it; `key` names the
    prior, for the store's memo)."""
    clusters = store.clusters

    def compute() -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        means = cluster_means(
            clusters.labels, store.scores, clusters.n_clusters, prior.quality,
            CLUSTER_PRIOR_OUTCOMES,
        )  # fmt: skip
        return means, cluster_weight(store.scores)

    means, weight = store.memo(f"cluster means:{key}", compute)
    return weight * means[clusters.assign(vectors)] + (1 - weight) * prior.quality


def cluster_output_tokens(
    store: RetrievalStore, vectors: NDArray[np.float32]
) -> NDArray[np.float64]:
    """For each query and model, the answer length to expect where the neighbours say
    nothing: the model's mean on the query's cluster, shrunk by CLUSTER_PRIOR_OUTCOMES
    towards every model's mean there (a kind of query, code say, draws long answers
    from every model; one short answer of a model elsewhere says little)."""
    clusters = store.clusters

    def compute() -> NDArray[np.float64]:
        tokens = store.output_tokens
        known = ~np.isnan(tokens)
        everyone = float(tokens[known].mean()) if known.any() else DEFAULT_OUTPUT_TOKENS
        # Every model's answers on a query, as one column: their total and count.
        row_sums = np.where(known, tokens, 0.0).sum(axis=1, keepdims=True)
        row_counts = known.sum(axis=1, keepdims=True).astype(float)
        sums = np.zeros((clusters.n_clusters, 1))
        counts = np.zeros((clusters.n_clusters, 1))
        np.add.at(sums, clusters.labels, row_sums)
        np.add.at(counts, clusters.labels, row_counts)
        per_cluster = (sums + everyone) / (counts + 1.0)
        return cluster_means(
            clusters.labels, tokens, clusters.n_clusters, per_cluster, CLUSTER_PRIOR_OUTCOMES
        )

    return store.memo("cluster output tokens", compute)[clusters.assign(vectors)]


def cluster_uncertainty(store: RetrievalStore, vectors: NDArray[np.float32]) -> Uncertainty | None:
    """Each query's cluster and the variance of each model's mean score there: the
    variance of a Beta belief from a uniform prior and the model's outcomes in the
    cluster (a few outcomes, a wide belief). Only for a small store (fewer than
    SMALL_STORE_QUERIES stored queries, none while nothing is stored): on live
    traffic most models have few outcomes in most clusters for long, and a window
    kept on its single best model then learned nothing else (cold-start bench:
    last block 5.6 points below the warm-started router, 0.8-2.8 without it);
    exploration is what answers that uncertainty."""
    if not 0 < len(store.scores) < SMALL_STORE_QUERIES:
        return None
    clusters = store.clusters

    def compute() -> NDArray[np.float64]:
        good, counts = cluster_totals(clusters.labels, store.scores, clusters.n_clusters)
        mean = (good + 1.0) / (counts + 2.0)
        return mean * (1.0 - mean) / (counts + 3.0)

    variance = store.memo("cluster variance", compute)
    assigned = clusters.assign(vectors)
    return Uncertainty(assigned, variance[assigned])


class KnnEstimates(NamedTuple):
    quality: NDArray[np.float64]
    cost: NDArray[np.float64]
    output_tokens: NDArray[np.float64]
    support: NDArray[np.float64]


def knn_estimates(
    store: RetrievalStore,
    vectors: NDArray[np.float32],
    settings: KnnSettings,
    beliefs: Beliefs | None = None,
) -> KnnEstimates:
    """Quality, cost and output tokens of every model from the nearest stored queries,
    and the support of each quality estimate: the neighbours' known outcomes
    (weighted) plus the prior's strength as far as the prior rests on outcomes."""
    beliefs = beliefs or Beliefs.none(len(store.models))
    prior = store.memo(f"priors:{beliefs.key()}", lambda: priors(store, beliefs))
    shape = (len(vectors), len(store.models))
    quality_prior = cluster_priors(store, vectors, prior, beliefs.key())
    similarities, rows = store.search(vectors, settings.neighbours)
    # A cluster's mean shapes the estimate but, coarse as it is, does not narrow
    # the belief exploration draws from: support counts the neighbours' outcomes
    # and the model's prior as far as it rests on outcomes.
    prior_support = np.broadcast_to(settings.prior_strength * prior.weight, shape).copy()
    if rows.shape[1] == 0:
        return KnnEstimates(
            quality_prior,
            np.broadcast_to(prior.cost, shape).copy(),
            cluster_output_tokens(store, vectors),
            prior_support,
        )
    weights = neighbour_weights(similarities, settings.temperature)
    weights = np.where(rows >= 0, weights, 0.0)
    rows = np.maximum(rows, 0)
    neighbours = store.scores[rows]
    quality = shrunk_mean(neighbours, weights, quality_prior, settings.prior_strength)
    # Cost and length carry no risk of overconfidence: a tiny prior only fills gaps.
    cost = shrunk_mean(store.costs[rows], weights, prior.cost, 1e-6)
    tokens = shrunk_mean(
        store.output_tokens[rows], weights, cluster_output_tokens(store, vectors), 1.0
    )
    support = (weights[:, :, None] * ~np.isnan(neighbours)).sum(axis=1) + prior_support
    return KnnEstimates(quality, cost, tokens, support)


class TrainedHeads:
    """One logistic regression per model: P(good answer | query vector).

    Fitted head by head with scikit-learn; predicted from their coefficients
    stacked at fit time (eleven `predict_proba` calls spent three quarters of
    their time validating the same input)."""

    def __init__(self, n_models: int, regularisation: float = 1.0) -> None:
        self.n_models = n_models
        self.regularisation = regularisation
        self.per_model: list[LogisticRegression | float] = [SHARED_PRIOR_QUALITY] * n_models
        self._stacked: StackedLogistic | None = None

    @property
    def fitted(self) -> bool:
        return self._stacked is not None

    def fit(self, vectors: NDArray[np.float32], scores: NDArray[np.float64]) -> TrainedHeads:
        """Fit on known outcomes only; a model with too few of either class gets its
        shrunk mean. Scores in (0, 1) count as the fraction of a good answer (sample
        weights)."""
        for j in range(self.n_models):
            known = ~np.isnan(scores[:, j])
            y = scores[known, j]
            good, bad = float(y.sum()), float((1 - y).sum())
            if min(good, bad) < MIN_OUTCOMES_PER_CLASS:
                shrunk = (good + STATED_PRIOR_OUTCOMES * SHARED_PRIOR_QUALITY) / (
                    len(y) + STATED_PRIOR_OUTCOMES
                )
                self.per_model[j] = shrunk
                continue
            x = vectors[known]
            features = np.vstack([x, x])
            labels = np.concatenate([np.ones(len(y)), np.zeros(len(y))])
            weights = np.concatenate([y, 1 - y])
            keep = weights > 0
            head = LogisticRegression(C=self.regularisation, max_iter=2000)
            head.fit(features[keep], labels[keep], sample_weight=weights[keep])
            self.per_model[j] = head
        self._stacked = StackedLogistic.of(self.per_model, vectors.shape[1])
        return self

    def predict(self, vectors: NDArray[np.float32]) -> NDArray[np.float64]:
        if self._stacked is None:
            return np.array([self.per_model], dtype=float).repeat(len(vectors), axis=0)
        return self._stacked.predict(vectors)

    def blended(
        self,
        retrieval: NDArray[np.float64],
        vectors: NDArray[np.float32],
        retrieval_weight: float,
    ) -> NDArray[np.float64]:
        """Retrieval's predictions blended with the heads': `retrieval_weight` of them
        where a model's head is a regression, all of them where it is only a mean
        (too few labels of a class). Such a head is shrunk towards the shared 0.5,
        while retrieval's prior holds what the user stated of the model, or what
        the store says of models of its price: blended, a model with no outcome
        was predicted 0.5 after the first refit, whatever its stated prior."""
        if self._stacked is None:
            return retrieval
        weight = np.where(np.isnan(self._stacked.constant), retrieval_weight, 1.0)
        return weight * retrieval + (1 - weight) * self._stacked.predict(vectors)


@dataclass(frozen=True)
class StackedLogistic:
    """Binary logistic regressions side by side: column j is P(class 1) of head j,
    or the constant of a head that is a number. Each column is one matrix-vector
    product in the heads' own dtype, as scikit-learn's `predict_proba` computes it,
    so the probabilities are the same to the bit (one matrix product for all
    heads rounds differently, by up to 4e-7, and saves under a microsecond a query)."""

    coef: NDArray[np.floating]  # (heads, dimension); 0 in a constant's row
    intercept: NDArray[np.floating]  # (heads,)
    constant: NDArray[np.float64]  # (heads,); NaN where the head is a regression

    @classmethod
    def of(
        cls, heads: Sequence[LogisticRegression | float], dimension: int
    ) -> StackedLogistic | None:
        """None if no head is a regression."""
        fitted = {j: h for j, h in enumerate(heads) if isinstance(h, LogisticRegression)}
        if not fitted:
            return None
        dtype = np.result_type(*(h.coef_ for h in fitted.values()))
        coef = np.zeros((len(heads), dimension), dtype=dtype)
        intercept = np.zeros(len(heads), dtype=dtype)
        for j, head in fitted.items():
            coef[j], intercept[j] = head.coef_[0], head.intercept_[0]
        constant = np.array([math.nan if j in fitted else h for j, h in enumerate(heads)])
        return cls(coef, intercept, constant)

    def predict(self, vectors: NDArray[np.float32]) -> NDArray[np.float64]:
        logits = np.column_stack([vectors @ row for row in self.coef]) + self.intercept
        return np.where(np.isnan(self.constant), expit(logits), self.constant)


@dataclass(frozen=True)
class FitReport:
    outcomes_used: int
    blend_weight: float  # weight of the retrieval part; 1 - it for the trained part
    holdout_brier_by_weight: dict[float, float]


class HybridFit(NamedTuple):
    """Heads and blend weight fitted on a store's outcomes, for `HybridPredictor.use`."""

    heads: TrainedHeads
    blend_weight: float
    report: FitReport


# The blend weight is chosen on at least this many held-out scores (else retrieval).
MIN_HOLDOUT_OUTCOMES = 20
# A refit waits until the store holds this many queries: fewer leave the heads
# their shrunk means and the blend on retrieval.
MIN_REFIT_QUERIES = 50


def refit_on(
    snapshot: tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64]],
    knn: KnnSettings,
) -> HybridFit | None:
    """`fit_hybrid` on a store's snapshot (`RetrievalStore.snapshot`), None while it
    holds fewer than MIN_REFIT_QUERIES queries. Pure: a router runs it off the
    serving thread and swaps the result in with `HybridPredictor.use`."""
    vectors, scores, costs = snapshot
    if len(vectors) < MIN_REFIT_QUERIES:
        return None
    return fit_hybrid(vectors, scores, costs, knn)


# A refit on the store's growth waits for at least this many new scored outcomes:
# fewer hardly move a head, and a small store's every window would refit it.
REFIT_LEAST_NEW_OUTCOMES = 200


def refit_due(scored: int, fitted_on: int, growth: float) -> bool:
    """Has the store grown enough since the heads were fitted to refit now? `scored`:
    the scored outcomes a refit's snapshot would hold now; `fitted_on`: those the
    heads were fitted on (0: never). Once it holds `growth` more, and at least
    REFIT_LEAST_NEW_OUTCOMES more (0: never by growth): a new store is refitted as
    its outcomes arrive, whatever the traffic's rate (ROUTER_REFIT_SECONDS's 300 s
    are 3,000 queries at 10 a second), a large one seldom; a store past
    ROUTER_REFIT_MAX_OUTCOMES, whose snapshot no longer grows, on the timer alone."""
    new = scored - fitted_on
    return growth > 0 and new > max(fitted_on * growth, REFIT_LEAST_NEW_OUTCOMES)


def fit_hybrid(
    vectors: NDArray[np.float32],
    scores: NDArray[np.float64],
    costs: NDArray[np.float64],
    knn: KnnSettings,
    holdout_fraction: float = 0.2,
    seed: int = 0,
) -> HybridFit:
    """Heads fitted on all outcomes, and the blend weight chosen on a held-out part.

    The held-out queries are predicted by heads and by retrieval that never
    saw them; the weight with the lowest Brier score on their known outcomes
    wins. Pure, so a worker can run it on a snapshot off the serving thread.
    """
    n_models = scores.shape[1]
    n = len(vectors)
    order = np.random.default_rng(seed).permutation(n)
    cut = int(n * holdout_fraction)
    holdout, train = order[:cut], order[cut:]
    brier: dict[float, float] = {}
    blend_weight = 1.0
    # Chosen on held-out scores only: with none held out (few scored among many
    # usage rows, early in a cold start) every Brier score was NaN and the first
    # weight, heads alone, won.
    if (~np.isnan(scores[holdout])).sum() >= MIN_HOLDOUT_OUTCOMES:
        inner = RetrievalStore([str(j) for j in range(n_models)], vectors.shape[1])
        inner.add_table([str(i) for i in train], vectors[train], scores[train], costs[train])
        knn_quality = knn_estimates(inner, vectors[holdout], knn).quality
        held_out_heads = TrainedHeads(n_models).fit(vectors[train], scores[train])
        truth = scores[holdout]
        known = ~np.isnan(truth)
        for weight in np.round(np.linspace(0, 1, 11), 2):
            blended = held_out_heads.blended(knn_quality, vectors[holdout], float(weight))
            brier[float(weight)] = float(np.mean((blended[known] - truth[known]) ** 2))
        blend_weight = min(brier, key=lambda w: (brier[w], -w))
    heads = TrainedHeads(n_models).fit(vectors, scores)
    if not heads.fitted:
        blend_weight = 1.0
    return HybridFit(
        heads, blend_weight, FitReport(int((~np.isnan(scores)).sum()), blend_weight, brier)
    )


class HybridPredictor:
    """Retrieval + trained heads; cost from list prices when known, else from neighbours."""

    def __init__(
        self,
        embedder: Embedder,
        store: RetrievalStore,
        prices: Mapping[str, ModelPrice] | None = None,
        knn: KnnSettings | None = None,
        blend_weight: float = 1.0,
        model_priors: Mapping[str, float] | None = None,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.prices = dict(prices or {})
        self.knn = knn or KnnSettings()
        self.beliefs = Beliefs.of(store.models, model_priors, prices)
        self.blend_weight = blend_weight
        self.heads = TrainedHeads(len(store.models))
        self.fitted_outcomes = 0  # scored outcomes the heads were fitted on

    @property
    def models(self) -> list[str]:
        return self.store.models

    def fit(self, holdout_fraction: float = 0.2, seed: int = 0) -> FitReport:
        """Refit the heads and the blend weight on everything in the store."""
        fitted = fit_hybrid(
            self.store.vectors,
            self.store.scores,
            self.store.costs,
            self.knn,
            holdout_fraction,
            seed,
        )
        self.use(fitted)
        return fitted.report

    def grown_since_fit(self, growth: float, last: int) -> bool:
        """`refit_due` for this predictor: the scored outcomes a refit's snapshot of
        the `last` stored queries would hold, against those its heads were fitted on."""
        return refit_due(self.store.scored_outcomes(last), self.fitted_outcomes, growth)

    def use(self, fitted: HybridFit) -> None:
        """Predict with heads and a blend fitted elsewhere (`refit_on`, off the
        serving thread); the store's later outcomes reach them at the next refit."""
        self.heads, self.blend_weight = fitted.heads, fitted.blend_weight
        self.fitted_outcomes = fitted.report.outcomes_used

    def predict(self, texts: Sequence[str]) -> Estimates:
        return self.predict_embedded(self.embedder.embed(texts), [len(t) for t in texts])

    def predict_embedded(
        self, vectors: NDArray[np.float32], prompt_chars: Sequence[int]
    ) -> Estimates:
        knn = knn_estimates(self.store, vectors, self.knn, self.beliefs)
        quality = knn.quality
        if self.blend_weight < 1.0:
            quality = self.heads.blended(knn.quality, vectors, self.blend_weight)
        cost = knn.cost.copy()
        prompt_tokens = np.array([math.ceil(c / CHARS_PER_TOKEN) for c in prompt_chars], float)
        for j, model in enumerate(self.models):
            price = self.prices.get(model)
            if price is not None:
                cost[:, j] = price.cost(prompt_tokens, knn.output_tokens[:, j])
        return Estimates(
            np.clip(quality, 0.0, 1.0),
            np.maximum(cost, 0.0),
            vectors,
            knn.support,
            cluster_uncertainty(self.store, vectors),
        )
