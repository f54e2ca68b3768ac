"""The static embedder is distilled offline from the packaged MiniLM, cached, and served
without torch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from workers.routing.static_embedder import StaticEmbedder, ensure_model, model_dir

# Distil only the ~160 word pieces that start with "th": the real build path on a
# vocabulary small enough for a test (the whole one takes 15 s to minutes here).
FEW_PIECES = r"^(?!th)"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = model_dir(tmp_path_factory.mktemp("embedders"), pca_dims=8)
    started = time.monotonic()
    ensure_model(folder, pca_dims=8, token_remove_pattern=FEW_PIECES)
    print(f"distilled {folder.name} in {time.monotonic() - started:.1f}s")
    return folder


def test_it_is_distilled_offline_from_the_packaged_model(
    small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = StaticEmbedder(small_model)
    vectors = embedder.embed(["the theory of them", "", "that thing there"])
    assert vectors.shape == (3, 8) and vectors.dtype == np.float32
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-3)
    assert embedder.name.startswith("static-all-MiniLM-L6-v2-pca8@")


def test_a_cached_model_is_not_distilled_again(small_model: Path) -> None:
    weights = small_model / "model.safetensors"
    built = weights.stat().st_mtime_ns
    # A pattern that removes every piece would fail if it were distilled again.
    ensure_model(small_model, pca_dims=8, token_remove_pattern=".*")
    assert weights.stat().st_mtime_ns == built


def test_serving_it_imports_neither_torch_nor_sentence_transformers(small_model: Path) -> None:
    """The router's memory target rests on this: torch alone is ~400 MB resident."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from workers.routing.static_embedder import StaticEmbedder\n"
        f"StaticEmbedder(Path({str(small_model)!r})).embed(['the theory'])\n"
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
