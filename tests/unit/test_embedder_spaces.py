"""Vectors of two embedders are never compared: a store holds one embedder's space."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from numpy.typing import NDArray

from workers.routing.store import OutcomeRecord, RetrievalStore, reembedded

MODELS = ["small", "large"]


class AxisEmbedder:
    """A toy embedder: text "a" -> (1, 0), anything else -> (0, 1)."""

    name = "axis-v2"
    dimension = 2

    def __init__(self) -> None:
        self.embedded: list[str] = []

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        self.embedded.extend(texts)
        return np.array([[1.0, 0.0] if t == "a" else [0.0, 1.0] for t in texts], np.float32)


def record(query_id: str, vector: list[float] | None, embedder: str | None, **fields: object):
    return OutcomeRecord(
        query_id=query_id,
        model="small",
        quality_score=1.0,
        cost_usd=None,
        output_tokens=None,
        embedding=None if vector is None else np.array(vector, np.float32),
        embedder=embedder,
        **fields,  # type: ignore[arg-type]
    )


def test_a_vector_of_another_embedder_is_refused() -> None:
    store = RetrievalStore(MODELS, 2, embedder="axis-v2")
    with pytest.raises(ValueError, match="axis-v1"):
        store.add(record("q", [1.0, 0.0], "axis-v1"))
    assert len(store) == 0


def test_stored_vectors_of_another_embedder_count_as_none() -> None:
    store = RetrievalStore(MODELS, 2, embedder="axis-v2")
    store.add(record("known", [0.0, 1.0], "axis-v2"))
    added = store.add_stored(
        [record("known", [1.0, 0.0], "axis-v1"), record("foreign", [1.0, 0.0], "axis-v1")]
    )
    assert added == 1  # the known query's score; the foreign query has no vector here
    assert not store.knows("foreign")
    np.testing.assert_array_equal(store.vectors, [[0.0, 1.0]])


def test_foreign_vectors_are_replaced_by_the_embedders_own_from_their_texts() -> None:
    embedder = AxisEmbedder()
    records = [
        record("old", [0.0, 1.0], "axis-v1", text="a"),
        record("old", None, None),  # a later score of the same query
        record("current", [0.0, 1.0], "axis-v2", text="b"),
        record("textless", [0.0, 1.0], "axis-v1"),
    ]
    fixed, count = reembedded(records, embedder, known=lambda _: False)
    assert count == 1 and embedder.embedded == ["a"]
    store = RetrievalStore(MODELS, 2, embedder="axis-v2")
    store.add_stored(fixed)
    assert sorted(store._row_of) == ["current", "old"]  # textless: nothing to place it by
    similarities, rows = store.search(np.array([[1.0, 0.0]], np.float32), 1)
    assert rows[0, 0] == store._row_of["old"] and similarities[0, 0] == pytest.approx(1.0)
