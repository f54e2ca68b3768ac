"""The predictor benchmark times every stage of a prediction on the store it seeds."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from workers.bench.predictor import cpu_ms_per_query, prepare
from workers.config import Settings


class HashEmbedder:
    """A unit vector per text, from its hash: no model to load."""

    name = "hash"
    dimension = 16

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        seeds = [int(hashlib.sha1(t.encode()).hexdigest()[:8], 16) for t in texts]
        vectors = np.array(
            [np.random.default_rng(s).normal(size=self.dimension) for s in seeds], np.float32
        ).reshape(-1, self.dimension)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_it_times_each_stage_of_predictions_against_a_seeded_store() -> None:
    settings = Settings(router_predict_batch=8)
    texts = [f"query {i}" for i in range(30)]
    bench = prepare(settings, HashEmbedder(), texts, outcomes=600, batches=3)
    predictor = bench.predictor
    assert len(predictor.store) == 600 and predictor.heads.fitted
    assert predictor.blend_weight == 0.5  # the heads' cost is counted
    assert [len(b) for b in bench.batches] == [8, 8, 8]
    figures = cpu_ms_per_query(bench)
    assert {"embed", "faiss search", "trained heads", "predict (all)"} <= set(figures)
