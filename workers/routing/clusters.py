"""Clusters of the stored queries: what a model did on a kind of query.

On real traffic a stored query has the outcome of the one model it was routed
to (or two, when explored), so a query's nearest neighbours rarely hold an
outcome of a model that gets little traffic, and the per-query estimate falls
back to that model's mean over every kind of query. Clusters fill the gap:
a judged answer of a model on one query of a cluster tells about that model on
all of them. The predictor shrinks its per-query estimate towards the
cluster's mean, and the cluster's mean towards the model's.

Centroids come from spherical k-means over the stored vectors, fitted anew
each time the store doubles (so growing and rebuilding a store in the same
order give the same clusters); rows added in between are assigned to the
nearest centroid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import faiss
import numpy as np
from numpy.typing import NDArray

# The first fit waits for this many stored queries. Clusters stay few and broad:
# their means must rest on enough outcomes of each model, and on live traffic a
# model's outcomes are spread over the clusters by routing (in the cold-start
# loop on RouterBench, 8 clusters learned faster than 16 or 32).
MIN_ROWS_TO_FIT = 64
MAX_CLUSTERS = 8
ROWS_PER_CLUSTER = 20


class QueryClusters:
    """Centroids and each stored query's cluster (0 for all until the first fit)."""

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self._centroids: faiss.Index | None = None
        self._labels = np.zeros(0, dtype=np.int64)
        self._fitted_at = 0

    @property
    def n_clusters(self) -> int:
        return 1 if self._centroids is None else int(self._centroids.ntotal)

    @property
    def next_fit_size(self) -> int:
        """The store size at which `extend` fits the centroids anew."""
        return max(MIN_ROWS_TO_FIT, 2 * self._fitted_at)

    @property
    def labels(self) -> NDArray[np.int64]:
        return self._labels

    def digest(self) -> str:
        """Names the assignment `assign` makes: two clusterings of equal digest put
        every vector in the same cluster (their centroids are the same)."""
        if self._centroids is None:
            return "one-cluster"
        centroids = self._centroids.reconstruct_n(0, self._centroids.ntotal)
        return hashlib.sha256(centroids.tobytes()).hexdigest()[:16]

    def assign(self, vectors: NDArray[np.float32]) -> NDArray[np.int64]:
        """The nearest centroid of each vector."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dimension)
        if self._centroids is None or len(vectors) == 0:
            return np.zeros(len(vectors), dtype=np.int64)
        _, nearest = self._centroids.search(vectors, 1)
        return nearest[:, 0].astype(np.int64)

    def extend(self, new: NDArray[np.float32], stored: Callable[[], NDArray[np.float32]]) -> None:
        """Label rows just added (`new`); refit on every stored vector (`stored()`, the
        new ones included) once the store has doubled since the last fit."""
        size = len(self._labels) + len(new)
        if size >= self.next_fit_size:
            self._fit(stored())
        else:
            self._labels = np.concatenate([self._labels, self.assign(new)])

    def _fit(self, vectors: NDArray[np.float32]) -> None:
        k = int(min(MAX_CLUSTERS, max(1, len(vectors) // ROWS_PER_CLUSTER)))
        # ROWS_PER_CLUSTER, not faiss's 39, is the least we ask of a centroid.
        kmeans = faiss.Kmeans(
            self.dimension, k, niter=20, seed=0, spherical=True, min_points_per_centroid=1
        )
        kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
        self._centroids = kmeans.index
        self._fitted_at = len(vectors)
        self._labels = self.assign(vectors)


def cluster_totals(
    labels: NDArray[np.int64], scores: NDArray[np.float64], n_clusters: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per cluster and model, the sum of the known scores and how many are known."""
    known = ~np.isnan(scores)
    sums = np.zeros((n_clusters, scores.shape[1]))
    counts = np.zeros((n_clusters, scores.shape[1]))
    np.add.at(sums, labels, np.where(known, scores, 0.0))
    np.add.at(counts, labels, known)
    return sums, counts


def cluster_means(
    labels: NDArray[np.int64],
    scores: NDArray[np.float64],
    n_clusters: int,
    prior: NDArray[np.float64],
    strength: float,
) -> NDArray[np.float64]:
    """Each cluster's mean score per model, shrunk towards `prior` (per model, or per
    cluster and model) by `strength` outcomes."""
    sums, counts = cluster_totals(labels, scores, n_clusters)
    return (sums + strength * prior) / (counts + strength)
