"""A store read back in batches equals one grown a record at a time: batched adds stop
where the index converts to an inverted file and where the clusters refit."""

from __future__ import annotations

import numpy as np

from workers.routing.store import OutcomeRecord, RetrievalStore

MODELS = ["a", "b"]


def test_batched_and_one_by_one_growth_give_the_same_store() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(900, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [
        OutcomeRecord(f"q{i}", MODELS[i % 2], float(i % 3 == 0), 0.01, 5, vectors[i])
        for i in range(900)
    ]
    one_by_one = RetrievalStore(MODELS, 16, ivf_threshold=400)
    for record in records:
        one_by_one.add(record)
    batched = RetrievalStore(MODELS, 16, ivf_threshold=400)
    assert batched.add_stored(records[:50]) == 50
    assert batched.add_stored(records[50:]) == 850

    np.testing.assert_array_equal(batched.vectors, one_by_one.vectors)
    np.testing.assert_array_equal(batched.scores, one_by_one.scores, strict=True)
    np.testing.assert_array_equal(batched.clusters.labels, one_by_one.clusters.labels)
    queries = vectors[:20] + 0.1
    for got, want in zip(batched.search(queries, 5), one_by_one.search(queries, 5), strict=True):
        np.testing.assert_array_equal(got, want)
