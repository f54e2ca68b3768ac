"""Clusters of stored queries: what a model did on a kind of query fills in where a
query's neighbours hold no outcome of that model (sparse outcomes, as on live
traffic) and in a small store, and changes little where a large store's every
query has one."""

from __future__ import annotations

import numpy as np

from workers.routing.clusters import MIN_ROWS_TO_FIT, QueryClusters
from workers.routing.predictor import (
    SMALL_STORE_QUERIES,
    KnnSettings,
    cluster_weight,
    knn_estimates,
)
from workers.routing.store import OutcomeRecord, RetrievalStore

MODELS = ["a", "b"]


def two_kinds(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Vectors around two far-apart centres in 8 dimensions, and which kind each is."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n)
    centres = np.eye(8)[[0, 4]]
    vectors = centres[kind] + 0.05 * rng.normal(size=(n, 8))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), kind


def test_clusters_wait_for_enough_queries_then_separate_kinds() -> None:
    vectors, kind = two_kinds(200)
    clusters = QueryClusters(8)
    clusters.extend(vectors[: MIN_ROWS_TO_FIT - 1], lambda: vectors[: MIN_ROWS_TO_FIT - 1])
    assert clusters.n_clusters == 1 and set(clusters.labels.tolist()) == {0}
    clusters.extend(vectors[MIN_ROWS_TO_FIT - 1 :], lambda: vectors)
    labels = clusters.labels
    assert clusters.n_clusters > 1 and len(labels) == 200
    # No cluster mixes the two kinds.
    for label in set(labels.tolist()):
        assert len(set(kind[labels == label].tolist())) == 1


def test_growing_and_rebuilding_give_the_same_clusters() -> None:
    vectors, _ = two_kinds(300)
    grown = RetrievalStore(MODELS, 8)
    for i, vector in enumerate(vectors):
        grown.add(OutcomeRecord(f"q{i}", "a", 1.0, None, None, vector))
    rebuilt = RetrievalStore.rebuild(
        MODELS, 8, [OutcomeRecord(f"q{i}", "a", 1.0, None, None, v) for i, v in enumerate(vectors)]
    )
    np.testing.assert_array_equal(grown.clusters.labels, rebuilt.clusters.labels)


def test_a_sparse_model_is_predicted_from_its_outcomes_on_the_same_kind_of_query() -> None:
    vectors, kind = two_kinds(400)
    store = RetrievalStore(MODELS, 8)
    for i, vector in enumerate(vectors):
        store.add(OutcomeRecord(f"q{i}", "a", 0.5, None, None, vector))
        if i % 5 == 0:  # "b" was tried on one query in five: right on kind 0 only
            store.add(OutcomeRecord(f"q{i}", "b", float(kind[i] == 0), None, None, None))
    probes, probe_kind = two_kinds(40, seed=1)
    quality = knn_estimates(store, probes, KnnSettings(neighbours=5)).quality[:, 1]
    # Its few outcomes on each kind tell the kinds apart, though a probe's five
    # nearest neighbours rarely hold one.
    assert quality[probe_kind == 0].min() > quality[probe_kind == 1].max() + 0.15


def test_a_model_s_answer_length_is_read_from_its_kind_of_query() -> None:
    """One short answer of a model on one kind of query must not make it look cheap on
    a kind where every model answers at length (code, say)."""
    vectors, kind = two_kinds(200)
    store = RetrievalStore(MODELS, 8)
    for i, vector in enumerate(vectors):
        store.add(OutcomeRecord(f"q{i}", "a", 1.0, None, 300 if kind[i] == 0 else 2, vector))
    short = int(np.flatnonzero(kind == 1)[0])
    store.add(OutcomeRecord(f"q{short}", "b", 1.0, None, 2, None))  # b's only answer: short
    probes, probe_kind = two_kinds(20, seed=1)
    tokens = knn_estimates(store, probes, KnnSettings(neighbours=5)).output_tokens[:, 1]
    assert tokens[probe_kind == 0].min() > 200
    assert tokens[probe_kind == 1].max() < 10


def test_a_small_store_predicts_a_model_from_its_kind_of_query_even_with_full_tables() -> None:
    """With few stored queries, every one holding every model's outcome, a query is
    shrunk towards the model's mean on its kind of query, not over all kinds (a
    model good at most tasks was predicted 0.74 on the one it fails, 0.37 real)."""
    vectors, kind = two_kinds(100)
    scores = np.column_stack([np.full(100, 0.5), (kind == 0).astype(float)])
    store = RetrievalStore(MODELS, 8)
    store.add_table([f"q{i}" for i in range(100)], vectors, scores, np.full((100, 2), 0.001))
    probes, probe_kind = two_kinds(40, seed=1)
    # A strong prior, as a neighbourhood of a few far neighbours weighs little beside it.
    quality = knn_estimates(store, probes, KnnSettings(neighbours=5, prior_strength=50.0)).quality
    assert quality[probe_kind == 1, 1].max() < 0.3
    assert quality[probe_kind == 0, 1].min() > 0.7


def test_the_cluster_weight_fades_as_a_full_store_grows_and_follows_sparsity() -> None:
    full_small, full_large = np.zeros((100, 2)), np.zeros((4 * int(SMALL_STORE_QUERIES), 2))
    np.testing.assert_allclose(cluster_weight(full_small), [1.0, 1.0])
    np.testing.assert_allclose(cluster_weight(full_large), [0.25, 0.25])
    sparse = np.full((4 * int(SMALL_STORE_QUERIES), 2), np.nan)
    sparse[::2, 0] = 1.0  # model 0 known on half the queries, model 1 on none
    np.testing.assert_allclose(cluster_weight(sparse), [0.5, 1.0])
