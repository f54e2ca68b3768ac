"""A store read back in batches equals one grown a record at a time: batched adds stop
where the index converts to an inverted file and where the clusters refit."""

from __future__ import annotations

import numpy as np

from workers.routing.store import OutcomeRecord, RetrievalStore, ivf_lists

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


def test_the_inverted_file_is_built_anew_with_more_lists_each_time_the_store_doubles() -> None:
    """A fixed number of lists made each query scan a growing share of the store
    (6% at 100,000 queries with 256 lists): the router's largest cost."""
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(3300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = RetrievalStore(MODELS, 16, ivf_threshold=400)
    lists = []
    for start in range(0, 3300, 100):
        ids = [f"q{i}" for i in range(start, start + 100)]
        nan = np.full((100, 2), np.nan)
        store.add_table(ids, vectors[start : start + 100], nan, nan)
        lists.append(getattr(store._index, "nlist", 0))
    assert lists[2] == 0 and lists[3] == ivf_lists(400)  # flat, then built at 400
    assert lists[-1] == ivf_lists(3200) > ivf_lists(1600) > ivf_lists(800) > ivf_lists(400)
