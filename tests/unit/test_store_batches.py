"""A store read back in batches equals one grown a record at a time: batched adds stop
where the index converts to an inverted file, where it is retrained with more lists,
and where the clusters refit. The inverted file's lists grow with the store."""

from __future__ import annotations

import numpy as np

from workers.routing.store import (
    IVF_MAX_LISTS,
    IVF_PROBES,
    IVF_ROWS_PER_LIST,
    OutcomeRecord,
    RetrievalStore,
    ivf_lists,
)

MODELS = ["a", "b"]


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, 16)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def records_of(vectors: np.ndarray) -> list[OutcomeRecord]:
    return [
        OutcomeRecord(f"q{i}", MODELS[i % 2], float(i % 3 == 0), 0.01, 5, vector)
        for i, vector in enumerate(vectors)
    ]


def test_batched_and_one_by_one_growth_give_the_same_store() -> None:
    vectors = unit_vectors(1100, seed=1)
    records = records_of(vectors)
    one_by_one = RetrievalStore(MODELS, 16, ivf_threshold=400)
    for record in records:
        one_by_one.add(record)
    batched = RetrievalStore(MODELS, 16, ivf_threshold=400)
    assert batched.add_stored(records[:50]) == 50
    assert batched.add_stored(records[50:]) == 1050
    assert batched.index_lists == one_by_one.index_lists == 16  # retrained at 512 and 1,024

    np.testing.assert_array_equal(batched.vectors, one_by_one.vectors)
    np.testing.assert_array_equal(batched.scores, one_by_one.scores, strict=True)
    np.testing.assert_array_equal(batched.clusters.labels, one_by_one.clusters.labels)
    queries = vectors[:20] + 0.1
    for got, want in zip(batched.search(queries, 5), one_by_one.search(queries, 5), strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_inverted_file_gets_more_lists_as_the_store_grows() -> None:
    """A query scans IVF_PROBES lists of about IVF_ROWS_PER_LIST queries each, not a
    fixed share of the store (256 lists scanned 6% of 100,000 stored queries)."""
    vectors = unit_vectors(4200, seed=2)
    records = records_of(vectors)
    store = RetrievalStore(MODELS, 16, ivf_threshold=400)
    lists_seen = []
    for start in range(0, 4200, 600):
        store.add_stored(records[start : start + 600])
        lists_seen.append(store.index_lists)
    assert lists_seen == [8, 16, 16, 32, 32, 32, 64]  # converted at 400 with 4, then doubled
    assert IVF_PROBES / store.index_lists < 0.3  # the share of the store a query scans
    np.testing.assert_array_equal(store.vectors, vectors)  # none lost in the retrainings


def test_the_number_of_lists_is_a_power_of_two_per_rows_per_list_up_to_its_cap() -> None:
    assert ivf_lists(20_000) == 256  # the conversion's, as before
    assert ivf_lists(2 * 256 * IVF_ROWS_PER_LIST) == 512
    assert ivf_lists(10**7) == IVF_MAX_LISTS
