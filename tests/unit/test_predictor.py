"""The predictor's maths: neighbour weighting, missing scores, priors, incremental store."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from workers.config import ModelPrice
from workers.routing.predictor import (
    HybridPredictor,
    KnnSettings,
    TrainedHeads,
    column_means,
    fit_hybrid,
    knn_estimates,
    neighbour_weights,
    shrunk_mean,
)
from workers.routing.store import OutcomeRecord, RetrievalStore

MODELS = ["small", "large"]


def unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


class NoEmbedder:
    """The maths tests hand vectors in directly."""

    name = "none"
    dimension = 3

    def embed(self, texts: object) -> np.ndarray:
        raise AssertionError("not used")


def test_nearest_neighbour_weighs_most_and_weights_fall_with_similarity() -> None:
    weights = neighbour_weights(np.array([[0.9, 0.85, 0.5]], dtype=np.float32), temperature=0.05)
    assert weights[0, 0] == 1.0
    assert weights[0, 1] == pytest.approx(np.exp(-1))
    assert weights[0, 0] > weights[0, 1] > weights[0, 2]


def test_a_missing_score_is_unknown_not_zero() -> None:
    values = np.array([[[1.0], [np.nan]]])  # two neighbours, one model; second unknown
    weights = np.array([[1.0, 1.0]])
    estimate = shrunk_mean(values, weights, prior=np.array([0.5]), prior_strength=1.0)
    # (1 * 1 + 1 * 0.5) / (1 + 1): the unknown neighbour adds neither weight nor zero.
    assert estimate[0, 0] == pytest.approx(0.75)


def test_a_model_without_outcomes_is_predicted_by_its_prior() -> None:
    values = np.array([[[1.0, np.nan], [0.0, np.nan]]])
    weights = np.array([[1.0, 1.0]])
    estimate = shrunk_mean(values, weights, prior=np.array([0.5, 0.8]), prior_strength=2.0)
    assert estimate[0, 1] == pytest.approx(0.8)
    assert estimate[0, 0] == pytest.approx((1 + 0 + 2 * 0.5) / 4)


def test_column_means_skip_unknowns_and_default_empty_columns() -> None:
    values = np.array([[1.0, np.nan], [0.0, np.nan], [np.nan, np.nan]])
    assert column_means(values, default=0.3).tolist() == [0.5, 0.3]


def records() -> list[OutcomeRecord]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(30):
        vector = unit(*rng.normal(size=3))
        for model in MODELS:
            if rng.random() < 0.8:
                score = None if rng.random() < 0.2 else float(rng.integers(0, 2))
                out.append(OutcomeRecord(f"q{i}", model, score, float(rng.random()), 10, vector))
    # A late quality score for an already stored query: no vector needed.
    out.append(OutcomeRecord("q3", "large", 1.0, None, None, None))
    return out


def test_incremental_add_equals_rebuild() -> None:
    history = records()
    grown = RetrievalStore(MODELS, 3)
    for record in history:
        grown.add(record)
    rebuilt = RetrievalStore.rebuild(MODELS, 3, history)

    np.testing.assert_array_equal(grown.scores, rebuilt.scores)
    np.testing.assert_array_equal(grown.costs, rebuilt.costs)
    probe = np.stack([unit(1, 0, 0), unit(0, 1, 1)])
    for got, want in zip(
        knn_estimates(grown, probe, KnnSettings(neighbours=5)),
        knn_estimates(rebuilt, probe, KnnSettings(neighbours=5)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want)


def test_a_late_score_fills_the_row_and_keeps_the_cost() -> None:
    store = RetrievalStore(MODELS, 3)
    store.add(OutcomeRecord("q", "small", None, 0.002, 12, unit(1, 0, 0)))
    store.add(OutcomeRecord("q", "small", 1.0, None, None, None))
    assert len(store) == 1
    assert store.scores[0].tolist()[0] == 1.0
    assert store.costs[0, 0] == pytest.approx(0.002)
    assert np.isnan(store.scores[0, 1])


def test_an_unknown_query_without_a_vector_is_refused_by_add_and_skipped_by_rebuild() -> None:
    orphan = OutcomeRecord("never-seen", "small", 1.0, None, None, None)
    with pytest.raises(ValueError, match="need its vector"):
        RetrievalStore(MODELS, 3).add(orphan)
    assert len(RetrievalStore.rebuild(MODELS, 3, [orphan])) == 0


def test_an_outcome_for_an_unrouted_model_is_refused() -> None:
    with pytest.raises(KeyError, match="not one of the store's models"):
        RetrievalStore(MODELS, 3).add(OutcomeRecord("q", "gpt-9", 1.0, 0.1, 1, unit(1, 0, 0)))


def test_neighbours_decide_quality_and_cost() -> None:
    store = RetrievalStore(MODELS, 3)
    store.add_table(
        ["near", "far"],
        np.stack([unit(1, 0, 0), unit(0, 0, 1)]),
        scores=np.array([[0.0, 1.0], [1.0, 0.0]]),
        costs=np.array([[0.001, 0.02], [0.003, 0.04]]),
    )
    quality, cost, _, _ = knn_estimates(
        store, unit(1, 0.05, 0)[None, :], KnnSettings(neighbours=2, prior_strength=0.01)
    )
    assert quality[0, 1] > 0.95 and quality[0, 0] < 0.05
    assert cost[0].tolist() == pytest.approx([0.001, 0.02], rel=1e-3)


def test_an_empty_store_predicts_the_neutral_prior() -> None:
    quality, cost, _, support = knn_estimates(
        RetrievalStore(MODELS, 3), unit(1, 0, 0)[None, :], KnnSettings()
    )
    assert quality.tolist() == [[0.5, 0.5]]
    assert cost.tolist() == [[0.0, 0.0]]
    assert support.tolist() == [[0.0, 0.0]]  # nothing stored: the prior alone


def test_list_prices_give_the_cost_from_tokens() -> None:
    store = RetrievalStore(MODELS, 3)
    store.add(OutcomeRecord("q", "large", 1.0, 0.5, 100, unit(1, 0, 0)))
    prices = {"large": ModelPrice(input_per_mtok_usd=10.0, output_per_mtok_usd=30.0)}
    predictor = HybridPredictor(NoEmbedder(), store, prices=prices)
    estimates = predictor.predict_embedded(unit(1, 0, 0)[None, :], prompt_chars=[400])
    # 400 characters ~ 100 prompt tokens at $10/M, plus 100 output tokens at $30/M.
    assert estimates.cost[0, 1] == pytest.approx((100 * 10 + 100 * 30) / 1e6)
    # Unpriced and never observed: the mean observed cost, never "free" (which
    # would draw all traffic to a model nobody knows).
    assert estimates.cost[0, 0] == pytest.approx(0.5)


def test_an_unpriced_model_costs_what_priced_ones_do_while_no_cost_is_observed() -> None:
    """An empty store observes no cost: an unpriced model was predicted free, so a
    window sent it everything (39 of 40 queries) and shadowed it without limit."""
    prices = {
        "large": ModelPrice(input_per_mtok_usd=10.0, output_per_mtok_usd=30.0),
        "small": ModelPrice(input_per_mtok_usd=0.2, output_per_mtok_usd=0.6),
    }
    store = RetrievalStore([*MODELS, "self-hosted"], 3)
    predictor = HybridPredictor(NoEmbedder(), store, prices=prices)
    cost = predictor.predict_embedded(unit(1, 0, 0)[None, :], prompt_chars=[2000]).cost[0]
    typical = [p.cost(500.0, 256.0) for p in prices.values()]
    assert cost[2] == pytest.approx(np.mean(typical))


def test_the_blend_is_retrieval_while_no_score_is_held_out() -> None:
    """200 queries with usage, 12 scored, none in the held-out fifth: every Brier
    score was NaN and the blend took the heads alone (weight 0), dropping the
    retrieval part, its priors included, until the next refit."""
    rng = np.random.default_rng(0)
    n = 200
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = np.full((n, 2), np.nan)
    held_in = np.random.default_rng(0).permutation(n)[n // 5 :]  # fit_hybrid's split
    scores[held_in[:12], 0] = [1.0] * 6 + [0.0] * 6
    fit = fit_hybrid(vectors, scores, np.full((n, 2), 0.01), KnnSettings())
    assert fit.blend_weight == 1.0 and fit.report.holdout_brier_by_weight == {}


def clustered_data(n: int, seed: int, linear: bool) -> tuple[np.ndarray, np.ndarray]:
    """Either vectors spread over the sphere with a label linear in the vector (a
    head learns it; neighbours in 16 dimensions are far apart), or tight clusters
    with a random label per cluster (only neighbours know it)."""
    rng = np.random.default_rng(seed)
    if linear:
        vectors = rng.normal(size=(n, 16))
        labels = (vectors @ rng.normal(size=16) > 0).astype(float)
    else:
        cluster = rng.integers(0, 8, n)
        vectors = rng.normal(size=(8, 16))[cluster] + 0.05 * rng.normal(size=(n, 16))
        labels = rng.integers(0, 2, 8)[cluster].astype(float)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), np.column_stack([labels, 1 - labels])


def test_heads_learn_a_linear_rule() -> None:
    vectors, scores = clustered_data(400, seed=1, linear=True)
    heads = TrainedHeads(2).fit(vectors[:300], scores[:300])
    predicted = heads.predict(vectors[300:])[:, 0] > 0.5
    assert (predicted == scores[300:, 0].astype(bool)).mean() > 0.8


def test_stacked_heads_predict_what_each_head_s_predict_proba_does() -> None:
    """One logistic over the stacked coefficients replaces a predict_proba per model:
    same probabilities, and a head with too few outcomes keeps its constant."""
    vectors, scores = clustered_data(400, seed=3, linear=True)
    soft = np.clip(scores[:, :1] * 0.8 + 0.1, 0, 1)  # fractional scores: sample weights
    sparse = np.full((400, 1), np.nan)
    sparse[:3] = 0.0  # three outcomes: a constant head
    table = np.column_stack([scores, soft, sparse])
    heads = TrainedHeads(4).fit(vectors[:300], table[:300])
    regressions = [h for h in heads.per_model if isinstance(h, LogisticRegression)]
    assert len(regressions) == 3 and heads.per_model[3] == pytest.approx(2.5 / 8)
    held_out = vectors[300:]
    expected = np.column_stack(
        [h.predict_proba(held_out)[:, 1] for h in regressions] + [np.full(100, 2.5 / 8)]
    )
    np.testing.assert_allclose(heads.predict(held_out), expected, rtol=0, atol=0)  # to the bit


def test_unfitted_heads_predict_the_shared_prior() -> None:
    assert TrainedHeads(2).predict(np.zeros((3, 16), np.float32)).tolist() == [[0.5, 0.5]] * 3
    assert TrainedHeads(0).predict(np.zeros((3, 16), np.float32)).shape == (3, 0)


def test_the_blend_weight_follows_the_data() -> None:
    for linear, expect_retrieval in ((False, True), (True, False)):
        vectors, scores = clustered_data(600, seed=2, linear=linear)
        store = RetrievalStore(MODELS, 16)
        store.add_table([str(i) for i in range(600)], vectors, scores, np.zeros_like(scores))
        # A weak prior: ten neighbours that agree must be able to carry the prediction.
        knn = KnnSettings(neighbours=10, prior_strength=1.0)
        predictor = HybridPredictor(NoEmbedder(), store, knn=knn)
        report = predictor.fit()
        assert report.blend_weight == min(
            report.holdout_brier_by_weight, key=report.holdout_brier_by_weight.get
        )  # type: ignore[arg-type]
        if expect_retrieval:
            assert report.blend_weight >= 0.5, report
        else:
            assert report.blend_weight <= 0.5, report


def clustered_vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, 32))
    vectors = centres[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, 32))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_growing_and_rebuilding_agree_across_the_switch_to_an_inverted_file() -> None:
    vectors = clustered_vectors(600, seed=3)
    history = [
        OutcomeRecord(f"q{i}", MODELS[i % 2], float(i % 3 == 0), 0.001, 5, vectors[i])
        for i in range(600)
    ]
    grown = RetrievalStore(MODELS, 32, ivf_threshold=400)
    for record in history:
        grown.add(record)
    rebuilt = RetrievalStore.rebuild(MODELS, 32, history, ivf_threshold=400)

    probe = clustered_vectors(20, seed=4)
    np.testing.assert_array_equal(grown.search(probe, 10)[1], rebuilt.search(probe, 10)[1])
    np.testing.assert_array_equal(grown.vectors, vectors)  # nothing lost in the switch


def test_the_inverted_file_finds_what_an_exact_search_finds() -> None:
    vectors = clustered_vectors(5000, seed=5)
    ids = [str(i) for i in range(5000)]
    nan = np.full((5000, 2), np.nan)
    exact = RetrievalStore(MODELS, 32, ivf_threshold=10**9)
    approximate = RetrievalStore(MODELS, 32, ivf_threshold=1000)
    for store in (exact, approximate):
        store.add_table(ids, vectors, nan, nan)
    probe = clustered_vectors(200, seed=6)
    _, want = exact.search(probe, 10)
    _, got = approximate.search(probe, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got, strict=True)])
    assert recall > 0.9, recall


def test_a_model_with_few_outcomes_gets_its_mean_shrunk_not_its_raw_mean() -> None:
    """Three judged answers, all wrong, must not make a model look hopeless."""
    vectors = np.eye(16, dtype=np.float32)[:3]
    heads = TrainedHeads(1).fit(vectors, np.array([[0.0], [0.0], [0.0]]))
    predicted = heads.predict(vectors)[:, 0]
    assert predicted == pytest.approx([2.5 / 8] * 3)  # (0 + 5 x 0.5) / (3 + 5)


def test_a_model_without_outcomes_keeps_its_stated_prior_after_a_refit() -> None:
    """A head with too few labels of a class is its mean shrunk towards 0.5: blended
    in, a model with no outcome and a stated prior of 0.2 was predicted 0.5 after
    the first refit (retrieval's prior, which holds the stated one, weighed 0)."""
    rng = np.random.default_rng(0)
    store = RetrievalStore(["a", "b", "new"], 8)
    vectors = rng.normal(size=(400, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for i, vector in enumerate(vectors):
        good = float(vector[0] > 0)  # the query decides: the heads have something to learn
        store.add(OutcomeRecord(f"q{i}", "a", good, 0.01, 10, vector))
        store.add(OutcomeRecord(f"q{i}", "b", 1 - good, 0.001, 10, vector))
    predictor = HybridPredictor(NoEmbedder(), store, model_priors={"new": 0.2})
    report = predictor.fit()
    assert report.blend_weight < 1.0  # the heads count for the models they know
    quality = predictor.predict_embedded(vectors[:5], prompt_chars=[100] * 5).quality
    assert quality[:, 2] == pytest.approx([0.2] * 5)
