"""The retrieval store: past queries' vectors (a FAISS index) and what each model did on them.

One row per distinct query; one column per model. An outcome that was not
observed is NaN: unknown, never 0. The store grows as outcomes arrive and can
be rebuilt from the outcomes table; both give the same rows.

Search is exact (a flat index) while the store is small. Once it holds
`ivf_threshold` queries, the flat index is replaced by an inverted-file index:
a query scans only the `IVF_PROBES` nearest of its lists. The index has a list
per `IVF_ROWS_PER_LIST` stored queries (`ivf_lists`, a power of two up to
`IVF_MAX_LISTS`) and is trained anew, on an even sample, each time that number
doubles: a query then scans about 16 x 64 vectors whatever the store's size up
to 65,536 queries, and 1.6% of a larger store (a fixed 256 lists scanned 6% of
100,000). Each retraining copies the vectors into the new index a chunk at a
time, so the store briefly holds them twice, never three times. Adding in the
same order converts and retrains at the same points, so growing and rebuilding
still give the same store.

Every vector in a store is of one embedder's space (`embedder`, its name): a
record whose vector another embedder made is refused by `add`, and read back
by `add_stored` as if it had none; `reembedded` gives such records vectors of
this store's embedder from their texts.

Each stored query also belongs to a cluster (workers/routing/clusters.py), so
what a model did on a kind of query can be read where its neighbours say
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar, cast

import faiss
import numpy as np
from numpy.typing import NDArray

from workers.routing.clusters import QueryClusters
from workers.routing.embedder import Embedder

T = TypeVar("T")

IVF_THRESHOLD = 20_000
IVF_ROWS_PER_LIST = 64
# More lists make each query cheaper but each retraining dearer (k-means over
# IVF_TRAINING_ROWS_PER_LIST x lists sample vectors, on the predictor thread):
# 1,024 lists train in 1-4 s on 2 busy cores, 2,048 in 18.
IVF_MAX_LISTS = 1024
IVF_PROBES = 16
IVF_TRAINING_ROWS_PER_LIST = 32
IVF_TRAINING_ROUNDS = 10
# Vectors copied from the old index into a retrained one per add.
IVF_COPY_CHUNK = 8192


def ivf_lists(size: int) -> int:
    """Lists of the inverted file of a store of `size` queries: one per
    IVF_ROWS_PER_LIST of them, rounded down to a power of two, at most IVF_MAX_LISTS."""
    lists = 1
    while lists * 2 * IVF_ROWS_PER_LIST <= size and lists * 2 <= IVF_MAX_LISTS:
        lists *= 2
    return lists


@dataclass(frozen=True)
class OutcomeRecord:
    """One model's outcome on one query, as the store needs it."""

    query_id: str
    model: str
    quality_score: float | None
    cost_usd: float | None
    output_tokens: int | None
    embedding: NDArray[np.float32] | None
    embedder: str | None = None  # whose vector space `embedding` is in
    text: str | None = None  # the query's text, to embed it anew


class RetrievalStore:
    def __init__(
        self,
        models: Sequence[str],
        dimension: int,
        ivf_threshold: int = IVF_THRESHOLD,
        embedder: str | None = None,
    ) -> None:
        self.models = list(models)
        self.dimension = dimension
        self.embedder = embedder
        self.ivf_threshold = ivf_threshold
        self._column = {m: j for j, m in enumerate(self.models)}
        self._row_of: dict[str, int] = {}
        self._index: faiss.Index = faiss.IndexFlatIP(dimension)
        self._quantizer: faiss.Index | None = None  # kept alive for the inverted file
        self._scores = np.full((0, len(self.models)), np.nan)
        self._costs = np.full((0, len(self.models)), np.nan)
        self._output_tokens = np.full((0, len(self.models)), np.nan)
        self._size = 0
        self._memo: dict[str, object] = {}  # values derived from the store, until it changes
        self.clusters = QueryClusters(dimension)

    def __len__(self) -> int:
        return self._size

    # The arrays are over-allocated and grown by doubling; views hide the spare rows.
    @property
    def scores(self) -> NDArray[np.float64]:
        return self._scores[: self._size]

    def scored_outcomes(self, last: int | None = None) -> int:
        """How many outcomes of the `last` stored queries (all if None) have a
        quality score: what a `snapshot(last)` would hold."""
        start = 0 if last is None else max(self._size - last, 0)
        return int(np.count_nonzero(~np.isnan(self.scores[start:])))

    @property
    def costs(self) -> NDArray[np.float64]:
        return self._costs[: self._size]

    @property
    def output_tokens(self) -> NDArray[np.float64]:
        return self._output_tokens[: self._size]

    @property
    def vectors(self) -> NDArray[np.float32]:
        """A copy of the stored vectors (the index holds the only one)."""
        if self._size == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return self._index.reconstruct_n(0, self._size)

    def snapshot(
        self, last: int | None = None
    ) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64]]:
        """Copies of vectors, scores and costs of the `last` stored queries (all if None)."""
        start = 0 if last is None else max(self._size - last, 0)
        vectors = (
            self._index.reconstruct_n(start, self._size - start)
            if self._size > start
            else np.zeros((0, self.dimension), dtype=np.float32)
        )
        return vectors, self.scores[start:].copy(), self.costs[start:].copy()

    def memo(self, name: str, compute: Callable[[], T]) -> T:
        """`compute()`, remembered until the store next changes (priors over 100,000
        rows would otherwise be recomputed for every batch)."""
        if name not in self._memo:
            self._memo[name] = compute()
        return cast(T, self._memo[name])

    @property
    def index_lists(self) -> int:
        """Lists of the inverted-file index; 0 while the search is exact."""
        index = self._index
        return int(index.nlist) if isinstance(index, faiss.IndexIVF) else 0

    def knows(self, query_id: str) -> bool:
        return query_id in self._row_of

    def column(self, model: str) -> int:
        try:
            return self._column[model]
        except KeyError:
            raise KeyError(f"model {model!r} is not one of the store's models") from None

    def _grow_to(self, rows: int) -> None:
        if rows <= len(self._scores):
            return
        capacity = max(rows, 2 * len(self._scores), 64)

        def grown(array: NDArray[np.float64]) -> NDArray[np.float64]:
            bigger = np.full((capacity, array.shape[1]), np.nan)
            bigger[: self._size] = array[: self._size]
            return bigger

        self._scores = grown(self._scores)
        self._costs = grown(self._costs)
        self._output_tokens = grown(self._output_tokens)

    def _new_rows(self, query_ids: Sequence[str], embeddings: NDArray[np.float32]) -> None:
        """Add rows in runs that stop where the index converts or the clusters refit,
        so a store grown in any batches equals one grown a row at a time."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1, self.dimension)
        start = 0
        while start < len(query_ids):
            end = start + min(len(query_ids) - start, self._rows_to_next_change())
            self._append_rows(query_ids[start:end], embeddings[start:end])
            start = end

    def _rows_to_next_change(self) -> int:
        limits = [self.clusters.next_fit_size - self._size]
        if isinstance(self._index, faiss.IndexFlat):
            if self._size < self.ivf_threshold:
                limits.append(self.ivf_threshold - self._size)
        elif self.index_lists < IVF_MAX_LISTS:
            limits.append(2 * self.index_lists * IVF_ROWS_PER_LIST - self._size)
        return max(1, min(limits))

    def _append_rows(self, query_ids: Sequence[str], embeddings: NDArray[np.float32]) -> None:
        self._grow_to(self._size + len(query_ids))
        for offset, query_id in enumerate(query_ids):
            self._row_of[query_id] = self._size + offset
        self._index.add(embeddings)
        size = self._size + len(query_ids)
        if isinstance(self._index, faiss.IndexFlat):
            if size >= self.ivf_threshold:
                self._replace_index()
        elif ivf_lists(size) > self.index_lists:
            self._replace_index()
        self._size = size
        self.clusters.extend(embeddings, lambda: self._index.reconstruct_n(0, self._size))
        self._memo.clear()

    def _replace_index(self) -> None:
        self._index = self._inverted_file(self._index)
        return_freed_memory()  # the old index's

    def _inverted_file(self, source: faiss.Index) -> faiss.IndexIVFFlat:
        """An inverted file with `ivf_lists` lists for what `source` holds, trained on an
        even sample of it (deterministic: the same vectors give the same index) and
        filled from it a chunk at a time."""
        size = source.ntotal
        lists = ivf_lists(size)
        quantizer = faiss.IndexFlatIP(self.dimension)
        index = faiss.IndexIVFFlat(quantizer, self.dimension, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0
        index.cp.niter = IVF_TRAINING_ROUNDS
        index.cp.max_points_per_centroid = IVF_TRAINING_ROWS_PER_LIST  # faiss samples no more
        index.cp.min_points_per_centroid = IVF_TRAINING_ROWS_PER_LIST  # nor warns of fewer
        sample = np.unique(np.linspace(0, size - 1, lists * IVF_TRAINING_ROWS_PER_LIST).astype(int))
        index.train(source.reconstruct_batch(sample))
        index.set_direct_map_type(faiss.DirectMap.Array)  # type: ignore[attr-defined]  # reconstruct_n
        for start in range(0, size, IVF_COPY_CHUNK):
            index.add(source.reconstruct_n(start, min(IVF_COPY_CHUNK, size - start)))
        index.nprobe = IVF_PROBES
        self._quantizer = quantizer  # the index borrows it
        return index

    def add(self, record: OutcomeRecord) -> None:
        """Record one outcome; a field left None keeps what the store knew."""
        column = self.column(record.model)
        if record.embedding is not None and record.embedder != self.embedder:
            raise ValueError(
                f"a vector of embedder {record.embedder!r} cannot join a store of "
                f"{self.embedder!r}: re-embed its text (`reembedded`)"
            )
        row = self._row_of.get(record.query_id)
        if row is None:
            if record.embedding is None:
                raise ValueError(f"query {record.query_id!r} is new to the store: need its vector")
            self._new_rows([record.query_id], record.embedding[None, :])
            row = self._size - 1
        self._set_outcome(row, column, record)

    def _set_outcome(self, row: int, column: int, record: OutcomeRecord) -> None:
        for array, value in (
            (self._scores, record.quality_score),
            (self._costs, record.cost_usd),
            (self._output_tokens, record.output_tokens),
        ):
            if value is not None:
                array[row, column] = value
                self._memo.clear()

    def add_stored(self, records: Iterable[OutcomeRecord]) -> int:
        """Add outcomes read back from the database; skip those of models no longer
        routed and of queries whose text was never seen (no vector to place them).
        A vector of another embedder counts as none. The new queries' vectors go into
        the index together (one add per batch, not per record: a 100,000-outcome
        rebuild took minutes one by one). Returns how many were added."""
        kept = [r for r in records if r.model in self._column]
        new: dict[str, NDArray[np.float32]] = {}
        for record in kept:
            own = record.embedding is not None and record.embedder == self.embedder
            if own and not self.knows(record.query_id):
                new.setdefault(record.query_id, record.embedding)  # type: ignore[arg-type]
        if new:
            self._new_rows(list(new), np.stack(list(new.values())))
        added = 0
        for record in kept:
            row = self._row_of.get(record.query_id)
            if row is not None:
                self._set_outcome(row, self._column[record.model], record)
                added += 1
        return added

    def add_table(
        self,
        query_ids: Sequence[str],
        embeddings: NDArray[np.float32],
        scores: NDArray[np.float64],
        costs: NDArray[np.float64],
    ) -> None:
        """Bulk load queries with every model's outcome (a RouterBench table)."""
        fresh = [i for i, q in enumerate(query_ids) if q not in self._row_of]
        fresh = list({query_ids[i]: i for i in fresh}.values())  # a repeated id counts once
        self._new_rows([query_ids[i] for i in fresh], embeddings[fresh])
        rows = np.array([self._row_of[q] for q in query_ids], dtype=int)
        for array, values in ((self._scores, scores), (self._costs, costs)):
            known = ~np.isnan(values)
            target = array[rows]
            target[known] = values[known]
            array[rows] = target
        self._memo.clear()

    def search(
        self, queries: NDArray[np.float32], k: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Cosine similarity and row of the k nearest stored queries (row -1: none;
        approximate once the store uses its inverted-file index)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dimension)
        if self._size == 0 or k == 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        similarities, rows = self._index.search(queries, min(k, self._size))
        return similarities, rows.astype(np.int64)

    @classmethod
    def rebuild(
        cls,
        models: Sequence[str],
        dimension: int,
        records: Iterable[OutcomeRecord],
        ivf_threshold: int = IVF_THRESHOLD,
        embedder: str | None = None,
    ) -> RetrievalStore:
        """A store from stored outcomes (oldest first). Skips models no longer routed
        and outcomes of queries whose text was never seen (no vector to place them)."""
        store = cls(models, dimension, ivf_threshold, embedder)
        store.add_stored(records)
        return store


def return_freed_memory() -> None:
    """Hand memory freed on the heap back to the operating system. glibc keeps it for
    reuse, so a replaced index's vectors (tens of MB in chunks below its mmap
    threshold) would stay in the router's resident memory; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)


def reembedded(
    records: Sequence[OutcomeRecord], embedder: Embedder, known: Callable[[str], bool]
) -> tuple[list[OutcomeRecord], int]:
    """The records, where one's vector is of another embedder (or missing) and its
    query is not `known` yet, with a vector of `embedder` made from its text, one
    batch for all; and how many texts were embedded. A record without a text keeps
    its foreign vector, which a store of `embedder` reads as none."""
    stale: dict[str, str] = {}
    for record in records:
        if (
            (record.embedder != embedder.name or record.embedding is None)
            and record.text
            and not known(record.query_id)
        ):
            stale.setdefault(record.query_id, record.text)
    if not stale:
        return list(records), 0
    vectors = dict(zip(stale, embedder.embed(list(stale.values())), strict=True))
    return [
        replace(record, embedding=vectors[record.query_id], embedder=embedder.name)
        if record.query_id in vectors
        else record
        for record in records
    ], len(stale)
