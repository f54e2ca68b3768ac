"""The router's predictor upkeep, without Kafka or a database."""

from __future__ import annotations

import faiss
import numpy as np
from numpy.typing import NDArray

from workers.config import Settings
from workers.stream.router_state import RouterState


class OneAxis:
    name = "one-axis"
    dimension = 2

    def embed(self, texts: list[str]) -> NDArray[np.float32]:
        return np.tile(np.array([1.0, 0.0], np.float32), (len(texts), 1))


def test_faiss_searches_on_the_predictor_thread_alone() -> None:
    """FAISS's OpenMP team spun on a busy machine: three times the CPU per query."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        RouterState(Settings(router_models=["a"]), OneAxis(), "")
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)
