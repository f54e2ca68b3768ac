"""Clusters of stored queries: what a model did on a kind of query fills in where a
query's neighbours hold no outcome of that model (sparse outcomes, as on live
traffic), and changes nothing where every stored query has one."""

from __future__ import annotations

import numpy as np

from workers.routing.clusters import MIN_ROWS_TO_FIT, QueryClusters
from workers.routing.predictor import KnnSettings, knn_estimates
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
